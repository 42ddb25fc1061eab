"""What one model can use of the loaded and folder embeddings: token tables, tokenizers, unusable names.

Embeddings get token ids after the vocabulary in order (loaded ones first, then the folder's by name); one whose
width does not fit the model, whose name is a vocabulary word (diffusers refuses those), or whose file cannot be
read is unusable: a prompt that names it gets that one-line reason.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import ModelFolderError, UserError
from ..layout import TEXT_ENCODERS
from .files import SDXL_KEYS, Embedding, scan_folder
from .tokens import EmbeddingTokenizer, find_sequences, vocab_collision

TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"   # its source name in the weight map


@dataclass(frozen=True)
class TokenTable:
    """Where one text encoder keeps its token embeddings: an initializer of shape (rows, width)."""
    encoder: str
    initializer: str
    rows: int
    width: int

    def read(self, model) -> np.ndarray:
        """The table's values from the graph file."""
        from ..lora.onnx_weights import OnnxWeights

        reader = OnnxWeights(model.folder / self.encoder / "model.onnx")
        try:
            return reader.read(self.initializer)
        finally:
            reader.close()


def token_table(model, encoder: str, vocab: int) -> TokenTable:
    """The encoder's token-embedding initializer: named by the weight map, else the graph's (vocab, D) tensor."""
    from ..lora.onnx_weights import OnnxWeights

    info = model.manifest.graphs.get(encoder) if model.manifest else None
    name = None
    if info is not None and info.weight_map:
        from ..lora.merge import GraphWeights
        weights = GraphWeights.load(model.folder, encoder, info.weight_map).weights
        entry = weights.get(TOKEN_EMBEDDING) or weights.get(TOKEN_EMBEDDING.removeprefix("text_model."))
        name = entry["initializer"] if entry else None
    reader = OnnxWeights(model.folder / encoder / "model.onnx")
    tensors = reader.tensors
    reader.close()
    if name is None:
        found = [t.name for t in tensors.values() if len(t.shape) == 2 and t.shape[0] == vocab]
        name = found[0] if len(found) == 1 else None
    if name is None or name not in tensors:
        raise ModelFolderError(f"{model.folder.name}/{encoder}: no token-embedding table found in the graph, so "
                               "textual-inversion embeddings cannot be added to it")
    rows, width = tensors[name].shape
    return TokenTable(encoder, name, int(rows), int(width))


@dataclass(frozen=True)
class Catalog:
    """The embeddings one model can use now, the tokenizers that know them, and the names it cannot use."""
    key: tuple
    embeddings: tuple               # Embedding, in token-id order
    tables: dict                    # encoder -> TokenTable
    tokenizers: dict                # tokenizer folder -> EmbeddingTokenizer
    unusable: dict                  # name -> one-line reason
    skipped: tuple = ()             # Embedding whose width does not fit this model (A1111's "skipped")

    def check(self, texts: list, syntax: str) -> bool:
        """Whether the prompts use an embedding (as their syntax finds them); an error for an unusable one."""
        tok = next(iter(self.tokenizers.values()))
        base_ids = [list(e.ids) for e in tok.base.backend.encode_batch(texts, add_special_tokens=False)]
        for ids in base_ids:
            for _, _, name in find_sequences(ids, tok.unusable_lookup):
                raise UserError(self.unusable[name])
        if syntax == "a1111":
            return any(next(find_sequences(ids, tok.lookup), None) for ids in base_ids)
        return any(tok.uses_embedding(t) for t in texts)


def _encoders(model) -> list:
    """(text encoder, tokenizer folder) pairs the model has."""
    return [(e, t) for e, t in TEXT_ENCODERS if model.has(e) and t in model.tokenizers]


def _fit(e: Embedding, tables: list) -> dict | str:
    """encoder -> (n, D) vectors of `e` for this model, or why it does not fit (A1111 compares summed widths)."""
    want = sum(t.width for t in tables)
    keys = [""] if len(tables) == 1 else list(SDXL_KEYS[:len(tables)])
    if e.shape != want or set(e.vectors) != set(keys) or any(
            e.vectors[k].shape[1] != t.width for k, t in zip(keys, tables)):
        takes = f"s take {want} (clip_l + clip_g) = {' + '.join(str(t.width) for t in tables)}" \
            if len(tables) > 1 else f" takes {want}"
        return (f"embedding {e.name} ({e.path.name}) has {e.shape}-wide vectors; this model's text encoder{takes}: "
                "it was made for another model")
    return {t.encoder: e.vectors[k] for k, t in zip(keys, tables)}


def build_catalog(model, loaded: tuple, folder, key: tuple = ()) -> Catalog:
    """Loaded embeddings first, then the folder's (a name already taken is left out), checked against the model."""
    found, bad = scan_folder(folder) if folder is not None else ([], {})
    pairs = _encoders(model)
    if not pairs:
        raise UserError(f"{model.folder.name}: no CLIP text encoder, so textual-inversion embeddings do not apply")
    base = model.tokenizers[pairs[0][1]]
    vocab = base.backend.get_vocab(with_added_tokens=True)
    tables = [token_table(model, e, len(vocab)) for e, _ in pairs]
    usable, skipped, unusable, taken = [], [], dict(bad), set()
    for e in list(loaded) + found:
        if e.name.lower() in taken:
            continue
        taken.add(e.name.lower())
        fit = _fit(e, tables)
        reason = fit if isinstance(fit, str) else vocab_collision(vocab, e.name, e.count)
        if reason:
            unusable[e.name] = reason
            skipped.append(e)
        else:
            usable.append(replace(e, vectors=fit))
    tokenizers = {t: EmbeddingTokenizer(model.tokenizers[t], usable, tables[0].rows, unusable) for _, t in pairs}
    return Catalog(key, tuple(usable), {t.encoder: t for t in tables}, tokenizers, unusable, tuple(skipped))
