"""Embeddings applied to a model: catalogs per folder state, and text encoders whose token table is extended.

The extended table (V + N, D) overrides the graph's token-embedding initializer when the session is built
(onnxruntime takes an override whose first dimension differs: the Gather just indexes more rows), on top of any
LoRA-merged initializers of that encoder, so LoRA and embeddings combine. Models with the extended encoders are
cached per (catalog, LoRA graphs) for servers; a one-shot CLI run builds them once without caching.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace

import numpy as np

from ..errors import UserError
from ..session import Graph
from .catalog import Catalog, build_catalog
from .files import Embedding, folder_stamp, read_embedding


class TextualInversion:
    """A pipeline's embeddings: files loaded one by one, plus a folder's; extended models cached (LRU)."""

    def __init__(self, max_models: int = 2):
        self.loaded, self.version, self.max_models = (), 0, max(1, int(max_models))
        self._catalogs, self._models, self._lock = OrderedDict(), OrderedDict(), threading.Lock()

    def load(self, model, path, token: str | None = None) -> Embedding:
        """Add one embedding file (its prompt word: `token`, else the file's stem); refused if it cannot be used."""
        e = read_embedding(path, token)
        if any(x.name.lower() == e.name.lower() for x in self.loaded):
            raise UserError(f"an embedding named {e.name} is already loaded")
        catalog = build_catalog(model, self.loaded + (e,), None)
        if e.name in catalog.unusable:
            raise UserError(catalog.unusable[e.name])
        self.loaded, self.version = self.loaded + (e,), self.version + 1
        return e

    def unload(self) -> None:
        """Forget the embeddings given to load."""
        self.loaded, self.version = (), self.version + 1

    def catalog(self, model, folder) -> Catalog:
        """What the model can use of the loaded embeddings and the folder's files as they are now."""
        key = (str(model.folder), self.version, folder_stamp(folder))
        with self._lock:
            if key in self._catalogs:
                self._catalogs.move_to_end(key)
                return self._catalogs[key]
        catalog = build_catalog(model, self.loaded, folder, key)
        with self._lock:
            self._catalogs[key] = catalog
            while len(self._catalogs) > 4:
                self._catalogs.popitem(last=False)
        return catalog

    def model_for(self, model, folder, texts: list, syntax: str):
        """`model` with the embeddings' tokenizers and extended text encoders when `texts` use one, else `model`."""
        catalog = self.catalog(model, folder)
        if not catalog.check(texts, syntax):
            return model
        if model.session_config.backend != "onnxruntime":
            raise UserError("textual-inversion embeddings extend onnxruntime sessions; use an onnxruntime --provider")
        key = (catalog.key, tuple(model.overlay.get(e) for e in catalog.tables))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        graphs = {e: _extended_graph(model, t, np.concatenate([x.vectors[e] for x in catalog.embeddings]))
                  for e, t in catalog.tables.items()}
        view = replace(model, tokenizers=model.tokenizers | catalog.tokenizers, overlay=model.overlay | graphs)
        if not model.one_shot:
            with self._lock:
                self._models[key] = view
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
        return view


def _extended_graph(model, table, rows: np.ndarray) -> Graph:
    """The text encoder with `rows` (N, D) appended to its token table, over its LoRA-merged weights if any."""
    base = model.overlay.get(table.encoder)
    initializers = dict(getattr(base, "initializers", None) or {})
    matrix = initializers.get(table.initializer)
    matrix = table.read(model) if matrix is None else matrix                           # (V, D)
    initializers[table.initializer] = np.ascontiguousarray(
        np.concatenate([matrix, rows.astype(matrix.dtype)]))                           # (V + N, D)
    return model.graph_with(table.encoder, initializers)
