"""Verification: run each exported graph with onnxruntime against its PyTorch module, judged by one rule.

The rule: fp32 graphs must match within the spec's max-abs tolerance; lossy graphs (fp16, int8) by PSNR.
A graph that cannot run here is reported as "not run" with the reason, never as a pass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.metrics import psnr

from .onnx_io import custom_ops, load_structure
from .specs import ComponentSpec, dims

LOSSY = ("fp16", "int8")
MIN_PSNR_DB = 35.0
INT8_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear",
            "MatMulIntegerToFloat", "DynamicQuantizeMatMul")   # the last two: onnxruntime's CPU fusions of the first


@dataclass(frozen=True)
class Check:
    """One graph run at one shape and compared to PyTorch, or the reason it could not run."""
    component: str
    shape: str                  # e.g. "2x256x256"
    max_abs: float
    limit: float
    finite: bool
    stage: str = "traced"       # traced (raw export) | optimised (the graph that ships)
    psnr_db: float | None = None
    min_psnr_db: float | None = None   # lossy graphs are judged by PSNR instead of max abs
    not_run: str = ""           # why the graph was not run here ("" when it ran)

    @property
    def ran(self) -> bool:
        """Whether the graph was actually run and compared."""
        return not self.not_run

    @property
    def ok(self) -> bool:
        """Ran, within tolerance, and free of NaN/Inf."""
        if not self.ran or not self.finite:
            return False
        if self.min_psnr_db is not None:
            return self.psnr_db is not None and bool(self.psnr_db >= self.min_psnr_db)
        return self.max_abs <= self.limit

    def describe(self) -> str:
        """One clause for an error message."""
        if not self.ran:
            return f"{self.component} ({self.stage}) not run: {self.not_run}"
        if self.min_psnr_db is not None:
            return f"{self.component} {self.shape} ({self.stage}) PSNR {self.psnr_db:.1f} dB < {self.min_psnr_db}"
        return f"{self.component} {self.shape} ({self.stage}) max abs error {self.max_abs:.3g} > {self.limit:.3g}"

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return asdict(self) | {"ok": self.ok}


def not_run(component: str, stage: str, reason: str) -> Check:
    """The record of a graph that could not be run here."""
    return Check(component, "-", float("nan"), float("nan"), False, stage, not_run=reason)


def graph_precision(graph: Path, declared: str) -> str:
    """The precision to judge a graph by: int8 when it holds quantised weights, else what the export declared."""
    model = load_structure(graph)
    quantized = any(n.op_type in INT8_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)
    return "int8" if quantized else declared


def compare(spec: ComponentSpec, module, session, d: dict, seed: int = 0, stage: str = "traced",
            precision: str = "fp32") -> Check:
    """Run torch and onnxruntime on the same sample inputs; worst max abs error and PSNR over all outputs."""
    import torch

    inputs = spec.sample_inputs(d, seed)
    with torch.no_grad():
        expected = [t.numpy() for t in spec.adapter(spec, module)(*inputs.values())]
    got = session.run([t.name for t in spec.outputs], {k: v.numpy() for k, v in inputs.items()})
    err, limit, finite, worst = 0.0, 0.0, True, float("inf")
    for e, g in zip(expected, got):
        g = g.astype(np.float32)
        finite &= bool(np.isfinite(g).all())
        err = max(err, float(np.abs(e - g).max()))
        limit = max(limit, spec.atol + spec.rtol * float(np.abs(e).max()))
        worst = min(worst, psnr(e, g)) if finite else worst
    return Check(spec.name, spec.label(d), err, limit, finite, stage, worst if finite else None,
                 MIN_PSNR_DB if precision in LOSSY else None)


def session_for(graph: Path, providers: tuple):
    """(session, None) on the first provider that can run the graph here, or (None, why not)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    available = [p for p in providers if p in ort.get_available_providers()]
    if not available:
        return None, f"needs {' or '.join(providers)}, which this onnxruntime lacks"
    try:
        return ort.InferenceSession(str(graph), opts, providers=available), None
    except Exception as e:  # onnxruntime's own exception types
        if "NOT_IMPLEMENTED" in str(e):
            ops = custom_ops(graph)
            return None, (f"{', '.join(available)} cannot run it (contrib ops {', '.join(ops[:4]) or 'unknown'}; "
                          "run verify on a machine with the target's provider)")
        raise


def verify_graph(spec: ComponentSpec, module, graph: Path, configs: dict, precision: str = "fp32",
                 stage: str = "traced", providers: tuple = ("CPUExecutionProvider",)) -> list[Check]:
    """Check one graph at every sample case of its spec, or one "not run" record saying why it cannot run here."""
    session, why = session_for(graph, providers)
    if session is None:
        return [not_run(spec.name, stage, why)]
    precision = graph_precision(graph, precision)
    return [compare(spec, module, session, dims(configs, *case), seed=i, stage=stage, precision=precision)
            for i, case in enumerate(spec.sample_cases(configs))]
