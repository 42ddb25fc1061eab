"""Checks that need no reference run: graph structure and dtypes, and the fp16 range probe of an fp32 graph."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .onnx_io import load_model, load_structure, save_model
from .specs import ComponentSpec, dims
from .verify import Check

FP16_MAX = 65504.0
MASK_SENTINEL = 1e30
# onnxruntime kernels registered in the ONNX domain that onnx itself does not define (RMSNorm fusions of T5 and
# SD3's MMDiT): the checker sees them in a separate domain, as it cannot know their schema.
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


def check_structure(graph: Path, fp16: bool) -> list[str]:
    """Problems with a graph that cannot be run here: checker, shape inference, I/O and weight dtypes."""
    import onnx
    from onnx import TensorProto

    problems = []
    model = load_structure(graph)
    checked = _checker_view(model, graph)
    try:
        onnx.checker.check_model(str(checked))
        onnx.shape_inference.infer_shapes_path(str(checked), str(graph) + ".inferred")
    except Exception as e:  # onnx raises several types; each is a structural failure
        problems.append(f"{graph.parent.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        Path(str(graph) + ".inferred").unlink(missing_ok=True)
        if checked != graph:
            checked.unlink(missing_ok=True)
    io = list(model.graph.input) + list(model.graph.output)
    bad_io = [t.name for t in io if t.type.tensor_type.elem_type == TensorProto.FLOAT16]
    if bad_io:
        problems.append(f"{graph.parent.name}: fp16 graph I/O {bad_io} (expected fp32 I/O)")
    if fp16 and not any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        problems.append(f"{graph.parent.name}: no fp16 weights in an fp16 graph")
    return problems


def _checker_view(model, graph: Path) -> Path:
    """The graph itself, or (with ORT_ONNX_DOMAIN_OPS) a copy beside it that moves those nodes to their own domain."""
    import onnx

    nodes = [n for n in model.graph.node if n.op_type in ORT_ONNX_DOMAIN_OPS and n.domain in ("", "ai.onnx")]
    if not nodes:
        return graph
    for n in nodes:
        n.domain = "onnxruntime.onnx_domain"
    model.opset_import.append(onnx.helper.make_opsetid("onnxruntime.onnx_domain", 1))
    view = graph.with_name(".checked." + graph.name)      # beside the graph: external data paths stay valid
    onnx.save(model, str(view))
    return view


def fp16_range_check(spec: ComponentSpec, graph: Path, configs: dict, fp32_ops: tuple) -> Check:
    """Run the fp32 graph on calibration inputs and find the largest activation of any op that fp16 will run."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(load_model(graph))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    produced = [o for n in model.graph.node if n.op_type not in fp32_ops for o in n.output]
    watched = [o for o in produced if types.get(o) == onnx.TensorProto.FLOAT]
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(v for v in model.graph.value_info if v.name in watched and v.name not in known)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # keep every watched tensor
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(dir=graph.parent) as tmp:     # > 2 GB graphs cannot be serialised inline
        save_model(model, Path(tmp) / "model.onnx")
        del model
        session = ort.InferenceSession(str(Path(tmp) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    d = dims(configs, *spec.sample_cases(configs)[-1])
    feeds = {k: v.numpy() for k, v in spec.sample_inputs(d).items()}
    outs = [a for a in session.run(None, feeds) if a.size and a.dtype == np.float32]
    nan = any(np.isnan(a).any() for a in outs)
    peak = max(_activation_peak(a) for a in outs)
    return Check(spec.name, "fp16 range", peak, FP16_MAX, not nan, stage="traced")


def _activation_peak(a: np.ndarray) -> float:
    """Largest magnitude, ignoring mask sentinels (-inf or dtype-min fills, which fp16 conversion clamps)."""
    a = np.abs(a)
    return float(a[a < MASK_SENTINEL].max(initial=0.0))
