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
    """A torch.nn.Module whose forward takes the spec's inputs (in order) and returns its outputs as a tuple."""
    import torch

    names = [t.name for t in spec.inputs]
    outputs = [t.name for t in spec.outputs]

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = module                  # a submodule, so its weights export as initializers

    class TextEncoder(Wrapper):
        def forward(self, input_ids):
            out = self.m(input_ids, output_hidden_states=any(n.startswith("hidden_states.") for n in outputs),
                         return_dict=True)
            return tuple(out.hidden_states[int(n.split(".")[1])] if n.startswith("hidden_states.")
                         else getattr(out, n) for n in outputs)

    class UNet(Wrapper):
        def forward(self, *args):
            a = dict(zip(names, args))
            added = {k: a[k] for k in ("text_embeds", "time_ids") if k in a}
            return (self.m(a["sample"], a["timestep"], a["encoder_hidden_states"], timestep_cond=a.get("timestep_cond"),
                           added_cond_kwargs=added or None, return_dict=False)[0],)

    class VaeEncoder(Wrapper):
        def forward(self, sample):
            return (self.m.encode(sample).latent_dist.parameters,)

    class VaeDecoder(Wrapper):
        def forward(self, latent_sample):
            return (self.m.decode(latent_sample, return_dict=False)[0],)

    classes = {"text_encoder": TextEncoder, "text_encoder_2": TextEncoder, "unet": UNet,
               "vae_encoder": VaeEncoder, "vae_decoder": VaeDecoder}
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
        elif t.name == "time_ids":                                    # sizes and crop offsets, in pixels
            out[t.name] = torch.randint(0, 1024, shape, generator=g).float()
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
    if len(files) == 1:
        os.replace(files[0], target)
    else:
        gather_external_data(tmp / "model.onnx", target)
    return target


def gather_external_data(src: Path, target: Path) -> None:
    """Rewrite a graph whose tensors live in many files so they live in one `model.onnx_data`, one at a time."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    offset = 0
    with open(target.parent / DATA_FILE, "wb") as out:
        for tensor in _get_all_tensors(model):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            with open(src.parent / info.location, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
            pad = -offset % 4096                                   # page-aligned, as onnx itself writes
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(blob)))):
                tensor.external_data.add(key=key, value=value)
            offset += len(blob)
    onnx.save_model(model, str(target))


def load_model(path: Path):
    """Load an ONNX model with its external data."""
    import onnx

    return onnx.load(str(path), load_external_data=True)


def tensor_bytes(model) -> int:
    """Bytes of tensor data a model holds inline (initializers and constants), without serialising it."""
    from onnx.external_data_helper import _get_all_tensors

    return sum(len(t.raw_data) or t.ByteSize() for t in _get_all_tensors(model))


def save_model(model, target: Path) -> None:
    """Save an ONNX model; one external data file beside it when it would exceed protobuf's 2 GB."""
    import onnx

    data = target.parent / DATA_FILE
    if data.exists():
        data.unlink()
    large = tensor_bytes(model) >= TWO_GB - 64 * 1024**2          # leave room for the graph itself
    onnx.save_model(model, str(target), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
