"""Trace one component to ONNX (TorchScript exporter) and save it with at most one external data file."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

from .specs import ComponentSpec, concrete_shape

TWO_GB = 2 * 1024**3
DATA_FILE = "model.onnx_data"


def wrapper(spec: ComponentSpec, module):
    """A torch.nn.Module whose forward takes the spec's inputs and returns its outputs as a tuple."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = module                  # a submodule, so its weights export as initializers

    class TextEncoder(Wrapper):
        def forward(self, input_ids):
            out = self.m(input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class UNet(Wrapper):
        def forward(self, sample, timestep, encoder_hidden_states):
            return (self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0],)

    class VaeEncoder(Wrapper):
        def forward(self, sample):
            return (self.m.encode(sample).latent_dist.parameters,)

    class VaeDecoder(Wrapper):
        def forward(self, latent_sample):
            return (self.m.decode(latent_sample, return_dict=False)[0],)

    classes = {"text_encoder": TextEncoder, "unet": UNet, "vae_encoder": VaeEncoder, "vae_decoder": VaeDecoder}
    return classes[spec.name]().eval()


def sample_inputs(spec: ComponentSpec, d: dict, seed: int = 0) -> dict:
    """Deterministic sample inputs (torch tensors) for one concrete shape."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in spec.inputs:
        shape = concrete_shape(t, d)
        if t.dtype == "int64":
            ids = torch.randint(1, 49405, shape, generator=g)
            ids[:, 0], ids[:, -1] = 49406, 49407                     # bos ... eos, as the tokenizer emits
            out[t.name] = ids
        elif shape == ():
            out[t.name] = torch.tensor(float(torch.randint(0, 1000, (), generator=g)), dtype=torch.float32)
        else:
            out[t.name] = torch.randn(shape, generator=g, dtype=torch.float32)
    return out


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
                wrapper(spec, module), tuple(inputs[t.name] for t in spec.inputs), str(traced),
                dynamo=False, input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes,
                opset_version=opset, do_constant_folding=True)
        return _finalise(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finalise(tmp: Path, dest: Path) -> Path:
    """Move a traced graph into place, gathering scattered external tensors into one data file."""
    files = list(tmp.iterdir())
    target = dest / "model.onnx"
    if len(files) == 1 and files[0].stat().st_size < TWO_GB:
        os.replace(files[0], target)
        return target
    save_model(load_model(tmp / "model.onnx"), target)
    return target


def load_model(path: Path):
    """Load an ONNX model with its external data."""
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_model(model, target: Path) -> None:
    """Save an ONNX model; one external data file beside it when it would exceed protobuf's 2 GB."""
    import onnx

    data = target.parent / DATA_FILE
    if data.exists():
        data.unlink()
    large = model.ByteSize() >= TWO_GB if _all_inline(model) else True
    onnx.save_model(model, str(target), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def _all_inline(model) -> bool:
    """True when no initializer refers to external data (ByteSize is then the full size)."""
    from onnx.external_data_helper import uses_external_data

    return not any(uses_external_data(t) for t in model.graph.initializer)
