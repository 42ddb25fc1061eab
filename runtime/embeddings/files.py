"""Textual-inversion embedding files: safetensors only (pickles are refused), read with the NumPy API.

Layouts: A1111's `emb_params` (n, D) and `string_to_param.*`, diffusers' single `{token: (n, D)}` key, SDXL's
`clip_l` / `clip_g` pair. The file's stem is its prompt word.
Reference: AUTOMATIC1111 modules/textual_inversion/textual_inversion.py (create_embedding_from_data, load_from_dir).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..lora.formats import PICKLES, read_tensors

SUFFIX = ".safetensors"
SDXL_KEYS = ("clip_l", "clip_g")                    # SDXL files: vectors for text_encoder, text_encoder_2


@dataclass(frozen=True)
class Embedding:
    """One embedding file: its prompt word and vectors per text encoder ("" for single-encoder files)."""
    name: str
    path: Path
    vectors: dict                   # "" or "clip_l" / "clip_g" -> (n, D) float32
    metadata: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Vectors (prompt tokens) it stands for: clip_g's for SDXL files, as A1111 counts."""
        return len(self.vectors.get("clip_g", next(iter(self.vectors.values()))))

    @property
    def shape(self) -> int:
        """A1111's `shape`: the vector width, summed over encoders (768 + 1280 = 2048 for SDXL)."""
        return sum(v.shape[1] for v in self.vectors.values())

    def item(self) -> dict:
        """The embedding as A1111's EmbeddingItem (step and checkpoint from the file's metadata, else None)."""
        meta = self.metadata
        step = meta.get("step")
        return {"step": int(step) if isinstance(step, str) and step.isdigit() else None,
                "sd_checkpoint": meta.get("sd_checkpoint"), "sd_checkpoint_name": meta.get("sd_checkpoint_name"),
                "shape": self.shape, "vectors": self.count}


def read_embedding(path, name: str | None = None) -> Embedding:
    """An embedding file's vectors; `name` (default: the file's stem) is its prompt word."""
    path = Path(path)
    if path.suffix.lower() not in PICKLES and not path.is_file():
        raise UserError(f"{path}: no such embedding file")
    tensors, metadata = read_tensors(path)
    if set(SDXL_KEYS) <= set(tensors):
        vectors = {k: _vectors(path, k, tensors[k]) for k in SDXL_KEYS}
        if len({len(v) for v in vectors.values()}) > 1:
            raise UserError(f"{path}: clip_l and clip_g hold different vector counts "
                            f"({', '.join(str(len(v)) for v in vectors.values())})")
    elif len(tensors) == 1:
        key, value = next(iter(tensors.items()))      # emb_params, string_to_param.* or diffusers' token
        vectors = {"": _vectors(path, key, value)}
    else:
        raise UserError(f"{path}: not a textual-inversion embedding (expected one tensor such as emb_params or "
                        f"string_to_param.*, or clip_l + clip_g; found {', '.join(list(tensors)[:4]) or 'none'})")
    return Embedding(name or path.stem, path, vectors, metadata)


def _vectors(path: Path, key: str, value: np.ndarray) -> np.ndarray:
    """One tensor as (n, D) float32 vectors; a 1-D tensor is one vector."""
    a = np.asarray(value)
    a = a[None] if a.ndim == 1 else a
    if a.ndim != 2 or a.shape[0] < 1 or a.dtype.kind != "f":
        raise UserError(f"{path}: tensor {key} has shape {list(np.shape(value))} ({a.dtype}); "
                        "expected (vectors, width) floats")
    if not np.isfinite(a).all():
        raise UserError(f"{path}: tensor {key} holds NaN or Inf values")
    return np.ascontiguousarray(a, dtype=np.float32)


def scan_folder(folder) -> tuple[list, dict]:
    """(embeddings, name -> why it is unusable) of a folder's files, sorted by name as A1111 lists them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"embeddings folder {folder}: no such folder")
    try:
        paths = sorted((p for p in folder.rglob("*") if p.suffix.lower() in PICKLES + (SUFFIX,) and p.is_file()),
                       key=lambda p: (p.stem.lower(), str(p)))
    except OSError as e:
        raise UserError(f"embeddings folder {folder}: cannot be read ({e.strerror or e})") from None
    found, bad = [], {}
    for path in paths:
        try:
            found.append(read_embedding(path))
        except UserError as e:
            bad.setdefault(path.stem, str(e))
    return found, bad


def folder_stamp(folder) -> tuple:
    """What identifies a folder's contents: each embedding file's path, size and modification time."""
    if folder is None or not Path(folder).is_dir():
        return (str(folder),)
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")
             if p.suffix.lower() in PICKLES + (SUFFIX,) and p.is_file()]
    return (str(folder), *sorted(stats))
