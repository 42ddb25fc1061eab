"""Textual-inversion embeddings at run time: a file's name becomes a prompt word whose vectors extend the text
encoder's token table (an initializer override at session build), without re-export and without PyTorch.

files (safetensors layouts -> vectors), tokens (diffusers' added tokens, A1111's id matching), catalog (what a
model can use, and why not), apply (extended text encoders, cached). A request whose prompts use no embedding
runs the plain graphs and tokens.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from .apply import TextualInversion
from .tokens import EmbeddingTokenizer


class TextualInversionMixin:
    """`load_textual_inversion`, `unload_textual_inversion` and `embeddings_dir` for a pipeline, as diffusers'
    TextualInversionLoaderMixin (applied per request, see embedding_view)."""
    embeddings_dir = None            # a folder whose embedding files prompts name by their file stem
    _textual_inversion = None

    @property
    def textual_inversion(self) -> TextualInversion:
        """The pipeline's embeddings (runtime.embeddings.apply.TextualInversion)."""
        if self._textual_inversion is None:
            self._textual_inversion = TextualInversion()
        return self._textual_inversion

    def load_textual_inversion(self, path, token: str | None = None):
        """Add an embedding file (.safetensors) for every following call; `token` (default: the file's stem) is
        its prompt word. A width that does not fit this model or a name that is a vocabulary word is refused."""
        return self.textual_inversion.load(self.model, path, token)

    def unload_textual_inversion(self) -> None:
        """Stop applying the embeddings given to load_textual_inversion."""
        if self._textual_inversion is not None:
            self._textual_inversion.unload()


def embedding_view(pipe, request):
    """`pipe`, or a view of it whose model encodes prompts with the embeddings, when the request's prompts use one."""
    ti = pipe._textual_inversion
    if pipe.embeddings_dir is None and (ti is None or not ti.loaded):
        return pipe
    negatives = request.negative_prompt
    texts = list(request.prompt) + ([negatives] if isinstance(negatives, str) else list(negatives or ()))
    model = pipe.textual_inversion.model_for(pipe.model, pipe.embeddings_dir, texts, request.prompt_syntax)
    if model is pipe.model:
        return pipe
    view = copy.copy(pipe)
    view.model, view.embeddings_dir, view._textual_inversion = model, None, None
    return view


def chunk_tokenizer(tokenizer):
    """A1111's chunk tokenizer (runtime.a1111) for a text encoder's tokenizer, finding embeddings when it has them."""
    from ..a1111 import clip_chunk_tokenizer

    if not isinstance(tokenizer, EmbeddingTokenizer):
        return clip_chunk_tokenizer(tokenizer)
    tok = clip_chunk_tokenizer(tokenizer.base)
    return replace(tok, encode=lambda texts: [tokenizer.a1111_ids(ids) for ids in tok.encode(texts)],
                   spans={ids[0]: len(ids) for ids in tokenizer.expand.values()})   # kept in one chunk


def use_folder(pipe, folder) -> None:
    """Let prompts name the embedding files of `folder` (`--embeddings DIR`): the folder and model are checked."""
    if folder is None:
        return
    if not Path(folder).is_dir():
        raise UserError(f"--embeddings {folder}: no such folder")
    if not isinstance(pipe, TextualInversionMixin) or pipe.model.facts.denoiser != "unet":
        raise UserError("textual-inversion embeddings apply to SD 1.x/2.x/SDXL folders (UNet and CLIP text "
                        "encoders); this model has none")
    pipe.embeddings_dir = Path(folder)


def list_embeddings(pipe) -> dict:
    """A1111's /sdapi/v1/embeddings for a pipeline: {"loaded": {name: item}, "skipped": {name: item}}."""
    ti = pipe._textual_inversion
    if pipe.embeddings_dir is None and (ti is None or not ti.loaded):
        return {"loaded": {}, "skipped": {}}
    catalog = pipe.textual_inversion.catalog(pipe.model, pipe.embeddings_dir)
    return {"loaded": {e.name: e.item() for e in catalog.embeddings},
            "skipped": {e.name: e.item() for e in catalog.skipped}}
