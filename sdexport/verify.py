"""Verification: run each exported graph with onnxruntime against its PyTorch module."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .export import sample_inputs, wrapper
from .specs import ComponentSpec, dims


@dataclass(frozen=True)
class Check:
    """One graph run at one shape, compared to PyTorch."""
    component: str
    shape: str                  # e.g. "2x256x256"
    max_abs: float
    limit: float
    finite: bool

    @property
    def ok(self) -> bool:
        """Within tolerance and free of NaN/Inf."""
        return self.finite and self.max_abs <= self.limit

    def to_dict(self) -> dict:
        """JSON form for the manifest."""
        return asdict(self) | {"ok": self.ok}


def verify_shapes(configs: dict) -> list[tuple[int, int, int]]:
    """(batch, height, width) to check: the model's native size at batch 2, and a smaller odd one at batch 1."""
    from .specs import vae_scale_factor

    native = configs["unet"]["sample_size"] * vae_scale_factor(configs["vae"])
    step = 8 * 2 ** (len(configs["unet"]["block_out_channels"]) - 1)  # latent sizes the UNet can halve
    small = max(step, (native // 2) // step * step)
    return [(2, native, native), (1, small, small + step)]


def compare(spec: ComponentSpec, module, session, d: dict, seed: int = 0) -> Check:
    """Run torch and onnxruntime on the same sample inputs; max abs error over all outputs."""
    import torch

    inputs = sample_inputs(spec, d, seed)
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper(spec, module)(*inputs.values())]
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got = session.run([t.name for t in spec.outputs], feeds)
    err, limit, finite = 0.0, 0.0, True
    for e, g in zip(expected, got):
        g = g.astype(np.float32)
        finite &= bool(np.isfinite(g).all())
        err = max(err, float(np.abs(e - g).max()))
        limit = max(limit, spec.atol + spec.rtol * float(np.abs(e).max()))
    shape = f"{d['batch']}x{d['height']}x{d['width']}" if spec.name != "text_encoder" else f"{d['batch']}x{d['sequence']}"
    return Check(spec.name, shape, err, limit, finite)


def verify_graph(spec: ComponentSpec, module, graph: Path, configs: dict, sequence: int = 77) -> list[Check]:
    """Check one exported graph at every verification shape on the CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    shapes = verify_shapes(configs)
    if spec.name == "text_encoder":
        shapes = [(2, 0, 0), (1, 0, 0)]
    return [compare(spec, module, session, dims(configs, b, h, w, sequence), seed=i)
            for i, (b, h, w) in enumerate(shapes)]
