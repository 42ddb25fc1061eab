"""Trace one component to ONNX (TorchScript exporter) and save it with at most one external data file."""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

from .onnx_io import move_traced
from .specs import ComponentSpec


def export_component(spec: ComponentSpec, module, inputs: dict, dest: Path, opset: int) -> Path:
    """Export to dest/model.onnx; weights over 2 GB go to one dest/model.onnx_data."""
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-trace-", dir=dest))
    try:
        traced = tmp / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")                  # tracer chatter about python-side shape checks
            torch.onnx.export(
                spec.adapter(spec, module), tuple(inputs[t.name] for t in spec.inputs), str(traced),
                dynamo=False, input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes,
                opset_version=opset, do_constant_folding=True)
        return move_traced(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
