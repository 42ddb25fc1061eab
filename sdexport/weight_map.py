"""Per-graph weight map: source parameter name -> ONNX initializer and the transform between them.

Built after every graph pass, by value: a source weight is found in the final graph as the same tensor (Conv),
its transpose (MatMul), its NHWC permutation (NhwcConv, GPU targets), or a set of columns of a packed tensor (onnxruntime's fused Attention / MultiHeadAttention
concatenate or interleave the transposed q, k, v weights). fp16 graphs are matched against the weights converted
the way the fp16 pass converts them. Weights no pass kept recognisable (int8, folded) are listed as unmapped,
so that the runtime can refuse a LoRA on them by name. The runtime (runtime.lora) merges LoRA deltas through it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .checkpoint_io import with_text_model_prefix

WEIGHT_MAP = "weight_map.json"
LORA_TYPES = ("unet", "clip")                          # component model types LoRA files adapt
FORMAT = 1
FLOAT_TYPES = {1: np.float32, 10: np.float16}         # onnx TensorProto element types the map follows
NHWC = (0, 2, 3, 1)                                    # Conv weight (out, in, kh, kw) -> NhwcConv's (out, kh, kw, in)


def _digest(a: np.ndarray) -> bytes:
    """A fingerprint of an array's bytes."""
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def source_weights(module, model_type: str) -> dict:
    """Canonical name -> fp32 NumPy array of every 2-D/4-D weight (the names LoRA files and diffusers use)."""
    named = {n: p.detach().float().numpy() for n, p in module.state_dict().items()
             if n.endswith(".weight") and p.dim() in (2, 4)}
    return with_text_model_prefix(named) if model_type == "clip" else named


def _as_graph_dtype(w: np.ndarray, dtype) -> np.ndarray:
    """A weight as the graph stores it: fp16 through the fp16 pass's own conversion (it clamps tiny values)."""
    if dtype == np.float32:
        return w
    from onnxruntime.transformers.float16 import convert_np_to_float16

    return convert_np_to_float16(w)


def _graph_tensors(path: Path) -> dict:
    """Initializer name -> array, for the float 2-D/4-D initializers of a graph (external data read per tensor)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_type in FLOAT_TYPES and len(t.dims) in (2, 4):
            out[t.name] = numpy_helper.to_array(t, base_dir=str(path.parent))
    return out


def _runs(cols: list) -> list:
    """Column indices as [start, stop) runs: [0, 1, 2, 8, 9] -> [[0, 3], [8, 10]]."""
    runs = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    return runs


def _packed_columns(w: np.ndarray, columns: dict):
    """(initializer, runs) holding w's transposed rows as columns of one packed tensor, or None."""
    hits = [columns.get((w.dtype.name, _digest(row)), ()) for row in w]     # w: (out, in); row i = column of W^T
    if not all(hits):
        return None
    for name in {n for n, _ in hits[0]}:
        cols, last = [], -2
        for options in hits:
            mine = sorted(c for n, c in options if n == name)
            if not mine:
                break
            nxt = last + 1 if last + 1 in mine else mine[0]                 # prefer contiguous runs
            cols.append(nxt)
            last = nxt
        if len(cols) == len(w):
            return name, _runs(cols)
    return None


def _forms(w: np.ndarray) -> list:
    """(array, how the graph holds it) for every layout a pass may give a weight: as is; MatMul's transpose;
    NhwcConv's (out, kh, kw, in) (onnxruntime's NHWC Conv fusion permutes Conv weights by (0, 2, 3, 1))."""
    if w.ndim == 2:
        return [(w, {"transpose": False}), (w.T, {"transpose": True})]
    return [(w, {"transpose": False}), (w.transpose(NHWC), {"transpose": False, "permute": list(NHWC)})]


def build_weight_map(graph: Path, module, model_type: str) -> dict:
    """The weight map of one exported graph against its source module."""
    tensors = _graph_tensors(graph)
    dtypes = {np.dtype(a.dtype).name for a in tensors.values()}
    whole = {}
    for name, a in tensors.items():
        whole.setdefault((a.dtype.name, a.shape, _digest(a)), []).append(name)
    weights, claimed, left = {}, {}, {}
    for pname, w in source_weights(module, model_type).items():
        entry = None
        for dtype in sorted(dtypes):
            g = _as_graph_dtype(w, np.dtype(dtype))
            found = next(((_unclaimed(whole[k], claimed), t) for f, t in _forms(g)
                          if (k := (dtype, f.shape, _digest(f))) in whole), None)
            if found:
                entry = {"initializer": found[0], **found[1], "dtype": dtype}
                break
        if entry is None:
            left[pname] = w
            continue
        weights[pname] = entry | {"shape": list(w.shape)}
        claimed.setdefault(entry["initializer"], []).append(pname)
    _match_packed(tensors, sorted(dtypes), left, weights, claimed)
    shared = {init: names for init, names in claimed.items()          # one tensor standing for equal weights
              if len(names) > 1 and not all("columns" in weights[n] for n in names)}
    return {"format": FORMAT, "graph": graph.name, "weights": weights, "shared": shared,
            "unmapped": sorted(left)}


def _match_packed(tensors: dict, dtypes: list, left: dict, weights: dict, claimed: dict) -> None:
    """Find the remaining 2-D source weights as column sets of unclaimed 2-D initializers (packed q/k/v)."""
    if not any(w.ndim == 2 for w in left.values()):
        return
    columns = {}
    for name, a in tensors.items():
        if a.ndim == 2 and name not in claimed:
            for c, col in enumerate(np.ascontiguousarray(a.T)):             # a: (in, K) -> K columns
                columns.setdefault((a.dtype.name, _digest(col)), []).append((name, c))
    for pname in [n for n, w in left.items() if w.ndim == 2]:
        w = left[pname]
        for dtype in dtypes:
            hit = _packed_columns(_as_graph_dtype(w, np.dtype(dtype)), columns)
            if hit:
                weights[pname] = {"initializer": hit[0], "transpose": True, "columns": hit[1], "dtype": dtype,
                                  "shape": list(w.shape)}
                claimed.setdefault(hit[0], []).append(pname)
                del left[pname]
                break


def _unclaimed(names: list, claimed: dict) -> str:
    """The first of equal-valued initializers no weight has claimed yet (else the first: a shared tensor)."""
    return next((n for n in names if n not in claimed), names[0])


def write_weight_map(folder: Path, module, model_type: str) -> Path:
    """Write <component>/weight_map.json beside model.onnx; returns its path."""
    data = build_weight_map(folder / "model.onnx", module, model_type)
    path = folder / WEIGHT_MAP
    path.write_text(json.dumps(data, indent=1))
    return path
