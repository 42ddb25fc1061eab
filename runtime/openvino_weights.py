"""OpenVINO models whose weights are stored at the precision the device runs them in (bf16): half the memory.

Read from an fp32 ONNX graph, OpenVINO's CPU plugin keeps every f32 weight alive beside the bf16 copies it packs for
its kernels: the full-size SD 1.5 UNet holds 5.5 GB after compiling (3.3 GB of it the f32 weights), and 8.7 GB at
the peak of a compile from a warm CACHE_DIR (hashing a model object reads every weight, beside the blob). An IR whose
large f32 constants are stored as bf16 behind a Convert marked as decompression (the run-time attribute OpenVINO's
own fp16 compression writes) keeps only bf16 weights: 3.5 GB, and the UNet's output is the same bit for bit,
because rounding to nearest even is what the plugin does to f32 weights when it runs bf16.

Built once per graph file into the OpenVINO cache folder (runtime.graph_cache's entries: written under a temporary
name and renamed into place), keyed by the file's identity and the OpenVINO version. Only used where the device runs
the graph in bf16; f32 hints (and the text encoders, which run f32) read the ONNX graph itself.
"""
from __future__ import annotations

import shutil
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from . import graph_cache

MIN_ELEMENTS = 1024          # smaller constants (shapes, norms' scales) stay as they are
MARK = "/bf16_weights"       # suffix of the Convert layers this module adds: the ones marked as decompression
FILE = "model.xml"


def runs_bf16(core, device: str, config: dict) -> bool:
    """Whether OpenVINO will run a graph compiled with `config` in bf16 on `device` (its CPU default where the CPU
    has native bf16, unless an f32 hint or the accuracy execution mode says otherwise)."""
    if config.get("EXECUTION_MODE_HINT", "").upper() == "ACCURACY":
        return False
    hint = config.get("INFERENCE_PRECISION_HINT", "bf16" if device == "CPU" else "")
    return hint == "bf16" and "BF16" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")


def to_bf16(values: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (finite values); in cache-sized chunks,
    in place, since the UNet's 860M weights through whole-array temporaries take 13 s instead of under 4."""
    bits = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    out = np.empty(bits.shape, np.uint16)
    for start in range(0, bits.size, chunk):
        part = bits[start:start + chunk]
        rounded = part >> np.uint32(16)
        rounded &= np.uint32(1)
        rounded += np.uint32(0x7FFF)
        rounded += part
        rounded >>= np.uint32(16)
        out[start:start + chunk] = rounded
    return out.reshape(np.shape(values))


def lowered(core, path: Path, where: str) -> Path | None:
    """The bf16-weight IR of the ONNX graph at `path` under `where`, built on first use; None when `where` is ''
    (caching off) or it could not be written (the caller reads the ONNX graph then)."""
    if not where:
        return None
    import openvino as ov

    entry = graph_cache.keyed(path, where, ["openvino-bf16-weights", ov.get_version()], FILE)
    if entry.ready:
        return entry.model
    tmp = None
    try:
        tmp = entry.staging()
        model = core.read_model(str(path))
        keep = _store_bf16(ov, model)          # the bf16 buffers the new constants point into, until saved
        ov.save_model(model, str(tmp / FILE), compress_to_fp16=False)
        del model, keep
        _mark_decompression(tmp / FILE)
    except (OSError, RuntimeError) as e:
        warnings.warn(f"{path.parent.name}: could not store its bf16 weights under {where} ({str(e).strip()[:120]}); "
                      "reading the fp32 graph")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return None
    return entry.model if entry.commit(tmp) or entry.ready else None


def _store_bf16(ov, model) -> list:
    """Replace each large f32 constant by a bf16 one behind a Convert to f32 (named with MARK)."""
    from openvino import opset13 as ops

    keep = []
    for node in model.get_ordered_ops():
        if (node.get_type_name() != "Constant" or node.get_element_type() != ov.Type.f32
                or int(np.prod(list(node.get_shape()))) < MIN_ELEMENTS):
            continue
        values = node.get_data()
        keep.append(to_bf16(values))
        convert = ops.convert(ov.op.Constant(ov.Tensor(keep[-1], list(values.shape), ov.Type.bf16)), ov.Type.f32)
        convert.set_friendly_name(node.get_friendly_name() + MARK)
        for target in node.output(0).get_target_inputs():
            target.replace_source_output(convert.output(0))
    return keep


def _mark_decompression(xml: Path) -> None:
    """Mark this module's Converts as weight decompression in the saved IR, so the plugin keeps the bf16 constants
    instead of folding them back to f32 (the attribute is not settable from Python; the IR format carries it)."""
    tree = ET.parse(xml)
    for layer in tree.getroot().iter("layer"):
        if layer.get("type") == "Convert" and layer.get("name", "").endswith(MARK) and layer.find("rt_info") is None:
            rt_info = ET.Element("rt_info")
            ET.SubElement(rt_info, "attribute", {"name": "decompression", "version": "0"})
            layer.insert(1, rt_info)                      # after <data>, before the ports, as OpenVINO writes it
    tree.write(xml, encoding="utf-8", xml_declaration=True)
