"""Per-target graph passes: onnxruntime transformer fusions, fp16 conversion, int8 quantisation, pre-optimisation.

What runs is decided by the profile's data (fusions table, precision, keep_fp32, fp32_ops, quantize_unet,
preoptimize) and the component's spec (optimizer model type); nothing here branches on target or component names.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .cpu_attention import rewrite_file as multihead_self_attention_file
from .onnx_io import DATA_FILE, STANDARD_DOMAINS, custom_ops, load_model, replace_model
from .profiles import Profile
from .quantize import int8_settings, quantize_dynamic_int8
from .specs import ComponentSpec



def fusion_options(spec: ComponentSpec, profile: Profile):
    """FusionOptions for this component with the profile's switches applied."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(spec.model_type)
    for key, value in profile.fusions.items():
        if key != "enabled" and hasattr(opts, key):
            setattr(opts, key, value)
    if spec.model_type == "unet" and not profile.fusions.get("use_multi_head_attention", True):
        # onnxruntime's UNet attention fusion ignores use_multi_head_attention and always emits
        # MultiHeadAttention for cross-attention; leaving attention unfused is the only way to honour false.
        opts.enable_attention = False
    return opts


def fuse(path: Path, spec: ComponentSpec, profile: Profile):
    """Run onnxruntime's transformers optimizer with the profile's fusion set; returns the OnnxModel."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with _quiet_logging(), _no_progress_bars():
        return optimize_model(str(path), model_type=spec.model_type, num_heads=0, hidden_size=0,
                              opt_level=0, optimization_options=fusion_options(spec, profile),
                              use_gpu=profile.provider != "CPUExecutionProvider")


@contextlib.contextmanager
def _quiet_logging():
    """No warnings from onnxruntime's optimizer modules, which also log under bare names (symbolic shape
    inference's "Cannot determine if ...", the MMDiT fusion's notes); restored afterwards."""
    import logging

    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _no_progress_bars():
    """Silence the UNet and MMDiT optimizers' tqdm bars (drawn whenever tqdm is importable); restored afterwards."""
    import sys

    from onnxruntime.transformers import onnx_model_mmdit, onnx_model_unet  # noqa: F401  (also under bare names)

    modules = [m for n, m in list(sys.modules.items()) if n.split(".")[-1] in ("onnx_model_unet", "onnx_model_mmdit")]
    originals = [m.is_installed for m in modules]
    for m, original in zip(modules, originals):
        m.is_installed = lambda name, _o=original: False if name == "tqdm" else _o(name)
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.is_installed = original


def optimize_component(path: Path, spec: ComponentSpec, profile: Profile) -> dict:
    """Apply the profile's passes to dest/model.onnx in place; returns what the manifest records."""
    precision = profile.component_precision(spec.name)
    if profile.fusion_enabled or precision == "fp16":
        model = fuse(path, spec, profile) if profile.fusion_enabled else _wrap(path)
        if precision == "fp16":
            with _quiet_logging():
                model.convert_float_to_float16(keep_io_types=True, op_block_list=list(profile.fp32_ops))
            model.topological_sort()
        _replace(path, model.model)
    if profile.multihead_self_attention:      # CPU: the tiled (flash) kernel, no (B, heads, S, S) buffer
        multihead_self_attention_file(path)
    quantize = int8_settings(profile).mode == "dynamic" and spec.model_type == "unet"
    if quantize:                        # static int8 needs the whole folder: quantize.static_int8 after export
        quantize_dynamic_int8(path)
    if profile.preoptimize != "disabled":
        preoptimize(path, profile.preoptimize)
    return {"precision": "int8" if quantize else precision, "custom_ops": custom_ops(path)}


def _wrap(path: Path):
    """An OnnxModel around the graph, for passes without fusion."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    return OnnxModel(load_model(path))


def _declare_domains(model) -> None:
    """Add the opset imports for contrib-op domains the passes introduced (onnx.checker requires them)."""
    import onnx

    declared = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node} - declared - set(STANDARD_DOMAINS)):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def _replace(path: Path, model) -> None:
    """Write a processed ModelProto over dest/model.onnx, declaring the contrib domains it uses."""
    _declare_domains(model)
    replace_model(path, model)


def preoptimize(path: Path, level: str) -> None:
    """Save onnxruntime's own graph optimisations (up to `level`) so deployment sessions start fast."""
    import onnxruntime as ort

    from runtime.session import LEVELS

    tmp_dir = path.parent / ".preopt"
    tmp_dir.mkdir(exist_ok=True)
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = LEVELS[level]
        opts.optimized_model_filepath = str(tmp_dir / "model.onnx")
        opts.log_severity_level = 3
        if (path.parent / DATA_FILE).exists():
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for f in tmp_dir.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
