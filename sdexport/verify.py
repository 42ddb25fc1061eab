"""Verification: run each exported graph with onnxruntime against its PyTorch module."""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .export import sample_inputs, save_model, wrapper
from .specs import ComponentSpec, dims, vae_scale_factor


@dataclass(frozen=True)
class Check:
    """One graph run at one shape, compared to PyTorch."""
    component: str
    shape: str                  # e.g. "2x256x256"
    max_abs: float
    limit: float
    finite: bool
    stage: str = "traced"       # traced (raw export) | optimised (the graph that ships)
    psnr_db: float | None = None
    min_psnr_db: float | None = None   # fp16 graphs are judged by PSNR instead of max abs

    @property
    def ok(self) -> bool:
        """Within tolerance and free of NaN/Inf."""
        if not self.finite:
            return False
        if self.min_psnr_db is not None:
            return self.psnr_db is not None and bool(self.psnr_db >= self.min_psnr_db)
        return self.max_abs <= self.limit

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return asdict(self) | {"ok": self.ok}


def verify_shapes(configs: dict) -> list[tuple[int, int, int]]:
    """(batch, height, width) to check: the model's native size at batch 2, and a smaller odd one at batch 1."""
    native = configs["unet"]["sample_size"] * vae_scale_factor(configs["vae"])
    step = 8 * 2 ** (len(configs["unet"]["block_out_channels"]) - 1)  # latent sizes the UNet can halve
    small = max(step, (native // 2) // step * step)
    return [(2, native, native), (1, small, small + step)]


FP16_MIN_PSNR_DB = 35.0


def psnr(expected: np.ndarray, got: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, peak = the reference's value range."""
    mse = float(np.mean((expected.astype(np.float64) - got) ** 2))
    peak = float(expected.max() - expected.min()) or 1.0
    return float("inf") if mse == 0 else float(10 * np.log10(peak * peak / mse))


def compare(spec: ComponentSpec, module, session, d: dict, seed: int = 0, stage: str = "traced",
            fp16: bool = False) -> Check:
    """Run torch and onnxruntime on the same sample inputs; max abs error over all outputs."""
    import torch

    inputs = sample_inputs(spec, d, seed)
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(spec, module)(*inputs.values())]
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = session.run([t.name for t in spec.outputs], feeds)
    err, limit, finite, worst = 0.0, 0.0, True, float("inf")
    for e, g in zip(expected, got):
        g = g.astype(np.float32)
        finite &= bool(np.isfinite(g).all())
        err = max(err, float(np.abs(e - g).max()))
        limit = max(limit, spec.atol + spec.rtol * float(np.abs(e).max()))
        worst = min(worst, psnr(e, g)) if finite else worst
    shape = f"{d['batch']}x{d['height']}x{d['width']}" if not spec.name.startswith("text_encoder") else f"{d['batch']}x{d['sequence']}"
    return Check(spec.name, shape, err, limit, finite, stage, worst if finite else None,
                 FP16_MIN_PSNR_DB if fp16 else None)


def cpu_session(graph: Path):
    """A CPU session for the graph, or None when it needs kernels the CPU provider lacks."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        if "NOT_IMPLEMENTED" in str(e):
            return None
        raise


def verify_graph(spec: ComponentSpec, module, graph: Path, configs: dict, sequence: int = 77,
                 stage: str = "traced", fp16: bool = False) -> list[Check]:
    """Check one exported graph at every verification shape on the CPU provider ([] if it cannot run there)."""
    session = cpu_session(graph)
    if session is None:
        return []
    fp16 = fp16 or is_quantized(graph)   # lossy graphs are judged by PSNR, not by fp32's max abs limit
    shapes = verify_shapes(configs)
    if spec.name.startswith("text_encoder"):
        shapes = [(2, 0, 0), (1, 0, 0)]
    return [compare(spec, module, session, dims(configs, b, h, w, sequence), seed=i, stage=stage, fp16=fp16)
            for i, (b, h, w) in enumerate(shapes)]


INT8_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear",
            "MatMulIntegerToFloat", "DynamicQuantizeMatMul")   # the last two: onnxruntime's CPU fusions of the first


def is_quantized(graph: Path) -> bool:
    """Whether a graph holds int8-quantised weights (dynamic or QLinear quantisation)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return any(n.op_type in INT8_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)


def check_structure(graph: Path, fp16: bool) -> list[str]:
    """Problems with a graph that cannot be run here: checker, shape inference, I/O and weight dtypes."""
    import onnx
    from onnx import TensorProto

    problems = []
    model = onnx.load(str(graph), load_external_data=False)
    try:
        onnx.checker.check_model(str(graph))
        onnx.shape_inference.infer_shapes_path(str(graph), str(graph) + ".inferred")
    except Exception as e:  # onnx raises several types; each is a structural failure
        problems.append(f"{graph.parent.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        Path(str(graph) + ".inferred").unlink(missing_ok=True)
    io = list(model.graph.input) + list(model.graph.output)
    bad_io = [t.name for t in io if t.type.tensor_type.elem_type == TensorProto.FLOAT16]
    if bad_io:
        problems.append(f"{graph.parent.name}: fp16 graph I/O {bad_io} (expected fp32 I/O)")
    if fp16 and not any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        problems.append(f"{graph.parent.name}: no fp16 weights in an fp16 graph")
    return problems


FP16_MAX = 65504.0


def fp16_range_check(spec: ComponentSpec, graph: Path, configs: dict, fp32_ops: tuple, sequence: int = 77) -> Check:
    """Run the fp32 graph on calibration inputs and find the largest activation of any op that fp16 will run."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(graph)))
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
    b, h, w = verify_shapes(configs)[-1]
    d = dims(configs, b, h, w, sequence)
    feeds = {k: v.numpy() for k, v in sample_inputs(spec, d).items()}
    outs = [a for a in session.run(None, feeds) if a.size and a.dtype == np.float32]
    nan = any(np.isnan(a).any() for a in outs)
    peak = max(_activation_peak(a) for a in outs)
    return Check(spec.name, "fp16 range", peak, FP16_MAX, not nan, stage="traced")


def _activation_peak(a: np.ndarray) -> float:
    """Largest magnitude, ignoring mask sentinels (-inf or dtype-min fills, which fp16 conversion clamps)."""
    a = np.abs(a)
    return float(a[a < MASK_SENTINEL].max(initial=0.0))


MASK_SENTINEL = 1e30
