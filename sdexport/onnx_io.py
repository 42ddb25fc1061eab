"""ONNX file I/O shared by export, optimisation and verification: at most one external data file per graph."""
from __future__ import annotations

import os
from pathlib import Path

TWO_GB = 2 * 1024**3
DATA_FILE = "model.onnx_data"
STANDARD_DOMAINS = ("", "ai.onnx")


def load_model(path: Path):
    """Load an ONNX model with its external data."""
    import onnx

    return onnx.load(str(path), load_external_data=True)


def load_structure(path: Path):
    """Load only the graph structure (nodes, I/O, initializer metadata), not the external weights."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


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


def replace_model(path: Path, model) -> None:
    """Write a processed ModelProto over path (model.onnx) and its data file, via a sibling temp file."""
    tmp = path.with_name("model.opt.onnx")
    save_model(model, tmp)
    data = path.parent / DATA_FILE
    if not (tmp.parent / DATA_FILE).exists() and data.exists():
        data.unlink()
    os.replace(tmp, path)


def gather_external_data(src: Path, target: Path) -> None:
    """Rewrite a graph whose tensors live in many files so they live in one `model.onnx_data`, one at a time."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = load_structure(src)
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


def move_traced(tmp: Path, dest: Path) -> Path:
    """Move a freshly traced graph from its scratch folder into dest, gathering scattered external tensors."""
    files = list(tmp.iterdir())
    target = dest / "model.onnx"
    if len(files) == 1:
        os.replace(files[0], target)
    else:
        gather_external_data(tmp / "model.onnx", target)
    return target


def custom_ops(path: Path) -> list[str]:
    """Operators outside the standard ONNX domain, as `domain.Op`, e.g. `com.microsoft.GroupNorm`."""
    return sorted({f"{n.domain}.{n.op_type}" for n in load_structure(path).graph.node
                   if n.domain not in STANDARD_DOMAINS})
