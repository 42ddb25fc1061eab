"""Merge LoRA updates into a graph's initializers, W' = W + scale * (alpha / r) * up @ down, through the weight map.

The weight map (written by sdexport.weight_map) says where each source weight lives in the graph: the same tensor
(Conv), its transpose (MatMul), its NHWC permutation (NhwcConv), or columns of a packed q/k/v tensor (fused attention). Updates of one initializer
are summed in float32 and added once, then cast to the graph's dtype; the result overrides the initializer when the
session is built (runtime.session.make_session `initializers`), so the graph file is never rewritten.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelFolderError, UserError
from .keys import delta_for
from .onnx_weights import OnnxWeights


@dataclass
class GraphWeights:
    """One graph's weight map, with its initializers read on demand."""
    component: str
    graph: Path
    weights: dict                    # source weight name -> {initializer, transpose, columns?, dtype, shape}
    shared: dict                     # initializer -> source weights that share it (equal tensors, deduplicated)
    unmapped: tuple                  # source weights no longer recognisable in the graph (int8, folded)
    _reader: OnnxWeights | None = field(default=None, repr=False)

    @staticmethod
    def load(folder: Path, component: str, map_file: str) -> "GraphWeights":
        """Read `<component>/weight_map.json` of an exported folder."""
        path = Path(folder) / map_file
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return GraphWeights(component, path.parent / data["graph"], data["weights"], data.get("shared", {}),
                                tuple(data.get("unmapped", ())))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelFolderError(f"{path}: not a readable weight map ({type(e).__name__}: {e})") from None

    @property
    def names(self) -> set:
        """Every source weight name LoRA may target (mapped or not)."""
        return set(self.weights) | set(self.unmapped)

    @property
    def shapes(self) -> dict:
        """Source weight name -> its shape (unmapped weights: unknown, so any)."""
        return {n: e["shape"] for n, e in self.weights.items()}

    def read(self, initializer: str) -> np.ndarray:
        """One initializer's current values from the graph file."""
        if self._reader is None:
            self._reader = OnnxWeights(self.graph)
        return self._reader.read(initializer)

    def entry(self, weight: str) -> dict:
        """The map entry of a source weight, or a one-line error saying why LoRA cannot reach it."""
        if weight in self.weights:
            return self.weights[weight]
        raise UserError(f"{self.component} {weight[:-len('.weight')]}: this export changed the weight beyond "
                        "recognition (int8 quantisation or folding), so a LoRA cannot be merged into it; "
                        "use an fp32/fp16 export")


def _place(work: np.ndarray, entry: dict, delta: np.ndarray) -> None:
    """Add a source-layout update to the float32 copy of its initializer, in the graph's layout."""
    if "permute" in entry:                                                # NhwcConv: (out, kh, kw, in)
        d = delta.reshape(entry["shape"]).transpose(entry["permute"])
    else:
        d = delta.T if entry["transpose"] else delta.reshape(work.shape)  # (in, out) for MatMul weights
    if "columns" not in entry:
        work += d
        return
    start = 0
    for a, b in entry["columns"]:                                         # packed q/k/v: runs of columns
        work[:, a:b] += d[:, start:start + b - a]
        start += b - a


def merged_initializers(graph: GraphWeights, updates: list) -> dict:
    """Initializer name -> merged array for `updates`: [(Target, scale)] of this component."""
    work, dtypes, touched = {}, {}, {}
    for target, scale in updates:
        entry = graph.entry(target.weight)
        name = entry["initializer"]
        if name not in work:
            base = graph.read(name)
            work[name], dtypes[name] = base.astype(np.float32), base.dtype
        _place(work[name], entry, delta_for(target, scale, entry["shape"]))
        touched.setdefault(name, set()).add(target.weight)
    for name, weights in touched.items():
        others = set(graph.shared.get(name, ())) - weights
        if others:
            raise UserError(f"{graph.component}: {sorted(weights)[0]} shares one tensor with {sorted(others)[0]} "
                            "in this graph (equal weights were deduplicated); a LoRA cannot change one alone")
    return {name: np.ascontiguousarray(a.astype(dtypes[name])) for name, a in work.items()}
