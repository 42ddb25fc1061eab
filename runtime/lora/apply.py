"""LoRA sets -> a model whose touched graphs run with merged weights; merged sessions cached per set (LRU).

A set is what one request asks for: ((file, weight), ...). Building it reads the files, places every layer on a
source weight (runtime.lora.keys), merges the updates per initializer (runtime.lora.merge) and builds sessions
with those initializers overridden. The cache keeps the most recently used sets, bounded by count and by the
bytes of the graphs they hold (each merged session holds a full copy of its graph's weights).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from ..errors import ModelFolderError, UserError
from ..layout import TEXT_ENCODERS
from .formats import load_lora
from .keys import resolve
from .library import check_scale, component_scale, find_lora
from .merge import GraphWeights, merged_initializers

COMPONENTS = ("unet",) + tuple(e for e, _ in TEXT_ENCODERS)


class LoraCache:
    """Merged graphs per LoRA set for one opened model, least recently used evicted first."""

    def __init__(self, model, max_sets: int = 2, max_bytes: int | None = None):
        self.model, self.max_sets, self.max_bytes = model, max(1, int(max_sets)), max_bytes
        self._sets, self._maps, self._lock = OrderedDict(), None, threading.Lock()

    def graph_weights(self) -> dict:
        """component -> GraphWeights, for the graphs of this folder that have a weight map."""
        if self._maps is None:
            manifest = self.model.manifest
            if manifest is None:
                raise UserError(f"{self.model.folder}: LoRA needs a folder written by sdexport convert (its weight "
                                "maps say where each weight went); this one has no sdexport.json")
            self._maps = {c: GraphWeights.load(self.model.folder, c, g.weight_map)
                          for c, g in manifest.graphs.items() if g.weight_map and _lora_graph(c)}
            if not self._maps:
                raise UserError(f"{self.model.folder}: exported without weight maps; re-export it with this "
                                "version of sdexport to apply LoRA files")
        return self._maps

    def model_for(self, loras: tuple, lora_dir=None, partial: bool = False):
        """The model with `loras` ((file or name, weight), ...) merged in; the plain model for an empty set."""
        if not loras:
            return self.model
        if self.model.session_config.backend != "onnxruntime":
            raise UserError("LoRA files are merged into onnxruntime sessions; use an onnxruntime --provider")
        files = tuple((find_lora(str(spec), lora_dir), check_scale(spec, scale)) for spec, scale in loras)
        key = (tuple((str(p.resolve()), _stamp(p), s) for p, s in files), bool(partial))
        with self._lock:
            if key in self._sets:
                self._sets.move_to_end(key)
                return self._sets[key][0]
        overlay, size = self._build(files, partial)
        merged = replace(self.model, overlay=overlay)
        with self._lock:
            self._sets[key] = (merged, size)
            self._evict()
        return merged

    def _build(self, files: tuple, partial: bool) -> tuple[dict, int]:
        """(component -> Graph with merged weights, bytes of the graphs they hold) for one set of files."""
        maps = self.graph_weights()
        names = {c: g.names for c, g in maps.items() if c in COMPONENTS}
        shapes = {c: g.shapes for c, g in maps.items() if c in COMPONENTS}
        lpb = _layers_per_block(self.model.folder)
        updates = {}
        for path, scale in files:
            for t in resolve(load_lora(path), names, shapes, lpb, partial):
                updates.setdefault(t.component, []).append((t, component_scale(scale, t.component)))
        overlay, size = {}, 0
        for graph in maps:                                  # unet updates reach unet_controlled too (ControlNet)
            items = updates.get(graph if graph in COMPONENTS else graph.split("_")[0], [])
            if items:
                overlay[graph] = self.model.graph_with(graph, merged_initializers(maps[graph], items))
                size += _graph_bytes(self.model.folder / graph)
        return overlay, size

    def _evict(self) -> None:
        """Drop least recently used sets beyond the count or byte bound (the newest always stays)."""
        while len(self._sets) > 1 and (len(self._sets) > self.max_sets or (
                self.max_bytes is not None and sum(s for _, s in self._sets.values()) > self.max_bytes)):
            self._sets.popitem(last=False)

    def clear(self) -> None:
        """Forget every merged set."""
        with self._lock:
            self._sets.clear()


def _lora_graph(name: str) -> bool:
    """Graphs LoRA files adapt: the UNet (and its ControlNet-fed copy `unet_*`) and the text encoders."""
    return name in COMPONENTS or name.startswith("unet_")


def _stamp(path: Path) -> tuple:
    """A file's size and modification time: a changed file is a new set."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _graph_bytes(folder: Path) -> int:
    """Bytes of a graph and its external data: about what a session of it holds in weights."""
    return sum(f.stat().st_size for f in folder.glob("model.onnx*") if f.is_file())


def _layers_per_block(folder: Path) -> int:
    """The UNet's layers per block (renames SDXL's SGM block numbers), from unet/config.json."""
    try:
        return int(json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
                   .get("layers_per_block", 2))
    except (OSError, ValueError, TypeError) as e:
        raise ModelFolderError(f"{folder}: unreadable unet/config.json ({e})") from None
