"""int8 graphs for the CPU provider: dynamic (UNet MatMul weights) and static QDQ (Conv + MatMul) calibrated on the
activations of real pipeline runs, each graph accepted only when the final image stays within the profile's PSNR.

The profile's `[int8]` table is the data (`mode = "off" | "dynamic" | "static"`, the graphs static mode quantises:
the UNet and/or the VAE decoder, op types, element types, calibration prompts and steps, the PSNR threshold);
`quantize_unet = true` is the older spelling of dynamic.
References: onnxruntime.quantization quantize_static / quantize_dynamic and CalibrationDataReader; the
u8 x s8 saturation note (reduce_range) in onnxruntime's quantization docs for x86 without VNNI.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from runtime.errors import UserError

from .onnx_io import DATA_FILE, load_model, save_model

MODES = ("off", "dynamic", "static")
ELEMENT_TYPES = ("int8", "uint8")
STATIC_GRAPHS = ("unet", "vae_decoder")      # graphs static int8 can quantise (calibrated on the pipeline's inputs)


@dataclass(frozen=True)
class Int8Settings:
    """The `[int8]` table with its defaults."""
    mode: str = "off"
    graphs: tuple = ("unet",)                     # static mode: of STATIC_GRAPHS, each gated on its own
    op_types: tuple = ("Conv", "MatMul")          # Gemm: only the time-embedding projections
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = True         # 7-bit weights: AVX2 / AVX-512 without VNNI saturate u8 x s8 sums otherwise
    calibration_prompts: tuple = ("a lighthouse at dusk, oil painting", "a red fox in fresh snow, photograph",
                                  "an isometric city at night, neon lights")
    gate_prompt: str = "a bowl of ripe lemons on a wooden table"     # held out: not among the calibration prompts
    steps: int = 4                    # denoising steps per calibration run and for the PSNR gate
    seed: int = 0
    guidance_scale: float = 7.5
    size: int = 0                     # image side for calibration and gate; 0 = the profile's opt height
    min_psnr_db: float = 30.0         # final image vs the fp32 graphs', same seed; below it that fp32 graph stays


_TYPES = {f.name: type(f.default) for f in fields(Int8Settings)}


def check_int8(table: dict, where: str) -> None:
    """Validate a profile's [int8] table: known keys, value types, modes and element types."""
    for key, value in table.items():
        if key not in _TYPES:
            raise UserError(f"{where}: int8.{key} is not an int8 setting (known: {', '.join(_TYPES)})")
        want = list if _TYPES[key] is tuple else _TYPES[key]
        ok = isinstance(value, want) or (want is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok or (want is int and isinstance(value, bool)):
            raise UserError(f"{where}: int8.{key} must be a {want.__name__}, got {value!r}")
    if table.get("mode", "off") not in MODES:
        raise UserError(f"{where}: int8.mode must be one of {', '.join(MODES)}, got {table['mode']!r}")
    for key in ("activation_type", "weight_type"):
        if table.get(key, "int8") not in ELEMENT_TYPES:
            raise UserError(f"{where}: int8.{key} must be one of {', '.join(ELEMENT_TYPES)}, got {table[key]!r}")
    graphs = table.get("graphs", ["unet"])
    if not graphs or any(g not in STATIC_GRAPHS for g in graphs):
        raise UserError(f"{where}: int8.graphs must list some of {', '.join(STATIC_GRAPHS)}, got {graphs!r}")


def int8_settings(profile) -> Int8Settings:
    """The profile's int8 settings (`quantize_unet = true` without a mode means dynamic)."""
    table = dict(profile.int8)
    if profile.quantize_unet and table.get("mode", "off") == "off":
        table["mode"] = "dynamic"
    return Int8Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})


def quantize_dynamic_int8(path: Path) -> None:
    """Dynamic int8 quantisation of MatMul/Gemm weights (activations quantised at run time), in place."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name("model.int8.onnx")
    # DefaultTensorType: shape inference cannot type the outputs of fused contrib ops (Attention, ...) in an
    # fp32 graph; without it quantize_dynamic fails on any fused UNet.
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     use_external_data_format=(path.parent / DATA_FILE).exists(),
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    _install(out, path)


def _install(quantized: Path, path: Path) -> None:
    """Replace path (model.onnx, its data file and side files) with the quantised graph saved beside it."""
    model = load_model(quantized)
    for f in path.parent.iterdir():
        if f.name not in ("config.json",) and f.is_file() and f != quantized:
            f.unlink()
    quantized.unlink()
    save_model(model, path)


def quantize_static_qdq(src: Path, dst: Path, feeds: list, s: Int8Settings) -> None:
    """QDQ quantisation of `s.op_types` in src, activation ranges from min/max over `feeds` (one run each)."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    logging.getLogger().setLevel(logging.ERROR)            # "consider pre-processing" and shape-inference notes
    typed = _with_types(src)
    try:
        quantize_static(str(typed), str(dst), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(s.op_types), per_channel=s.per_channel, reduce_range=s.reduce_range,
                        activation_type=types[s.activation_type], weight_type=types[s.weight_type],
                        calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=(src.parent / DATA_FILE).exists(),
                        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True,
                                       "CalibStridedMinMax": 1})    # one feed's intermediate outputs at a time
    finally:
        typed.unlink()


def _with_types(src: Path) -> Path:
    """A copy of src's graph (beside it, sharing its weight file) with every tensor typed by onnxruntime's
    symbolic shape inference: ONNX's own cannot type contrib-op outputs (QuickGelu, Attention, ...), and the
    calibrator skips untyped tensors, leaving the Conv or MatMul after them without an input scale."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = onnx.load(str(src), load_external_data=False)
    here = os.getcwd()
    os.chdir(src.parent)       # it reads constant initializers from the external data file relative to the cwd
    try:
        model = SymbolicShapeInference.infer_shapes(graph, auto_merge=True, guess_output_rank=True)  # the VAE needs guesses
    finally:
        os.chdir(here)
    typed = src.with_name("model.typed.onnx")
    onnx.save_model(model, str(typed))
    return typed


class FeedReader:
    """onnxruntime's CalibrationDataReader over recorded UNet feeds, strided (set_range) to bound memory."""

    def __init__(self, feeds: list):
        self.feeds, self.start, self.end, self.pos = feeds, 0, len(feeds), 0

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve feeds[start_index:end_index] next."""
        self.start, self.end, self.pos = start_index, min(end_index, len(self.feeds)), start_index

    def get_next(self):
        """The next feed dict, or None at the end of the range."""
        if self.pos >= self.end:
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]


class _Recorder:
    """A stand-in for a graph (Model.overlay) that keeps each call's feeds, one batch row per feed."""

    def __init__(self, graph, sink: list):
        self.graph, self.sink = graph, sink

    def __getattr__(self, name):
        return getattr(self.graph, name)

    def __call__(self, **feeds) -> dict:
        import numpy as np

        arrays = {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in feeds.items()}
        n = next(iter(arrays.values())).shape[0]           # the first input's batch: (2B, 4, h, w) with guidance
        for i in range(n):
            self.sink.append({k: v[i:i + 1] if v.ndim and v.shape[0] == n else v for k, v in arrays.items()})
        return self.graph(**feeds)


def _image(pipe, prompt: str, s: Int8Settings, size: int, output_type: str = "np"):
    """One pipeline run at the settings' steps, guidance and seed."""
    return pipe(prompt, height=size, width=size, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                seed=s.seed, output_type=output_type).images


def static_int8(folder: Path, profile, progress=lambda _: None) -> dict:
    """Calibrate, quantise and gate each of the settings' graphs in folder: {graph: (installed, check)}, installed
    True when the int8 graph replaced the fp32 one, False when the final image with it (the other graphs fp32)
    fell below the threshold and the fp32 graph was kept."""
    import numpy as np

    from runtime.metrics import max_abs, psnr
    from runtime.model import open_model
    from runtime.pipeline import StableDiffusionPipeline
    from runtime.session import Graph, make_session

    from .verify import Check

    s = int8_settings(profile)
    size = s.size or profile.shapes["height"].opt
    model = open_model(Path(folder), provider="cpu", verify=False)
    pipe, feeds = StableDiffusionPipeline(model), {name: [] for name in s.graphs}
    for name in s.graphs:
        model.overlay[name] = _Recorder(model.graph(name), feeds[name])
    for prompt in s.calibration_prompts:
        progress(f"int8: recording {' and '.join(s.graphs)} inputs ({prompt!r}, {s.steps} steps, {size}x{size})")
        _image(pipe, prompt, s, size, "np" if "vae_decoder" in s.graphs else "latent")
    model.overlay.clear()
    reference = _image(pipe, s.gate_prompt, s, size)                    # (1, H, W, 3) with every graph fp32
    checks = {}
    for name in s.graphs:
        path = Path(folder) / name / "model.onnx"
        model.release(only=(name,))
        progress(f"int8: calibrating and quantising {name} ({', '.join(s.op_types)}) on {len(feeds[name])} inputs")
        quantized = path.with_name("model.int8.onnx")
        quantize_static_qdq(path, quantized, feeds.pop(name), s)
        model.overlay[name] = Graph(lambda dims, q=quantized: make_session(q, model.session_config, None, "cpu", dims),
                                    name, model.session_config)
        got = _image(pipe, s.gate_prompt, s, size)
        model.overlay.clear()
        db = psnr(reference, got, peak=1.0)
        checks[name] = Check(name, f"1x{size}x{size}", max_abs(reference, got), 1.0, bool(np.isfinite(got).all()),
                             stage="int8 static: final image vs fp32", psnr_db=db, min_psnr_db=s.min_psnr_db)
    model.release()
    results = {}
    for name, check in checks.items():         # installed once every gate ran: each gate saw fp32 elsewhere
        path = Path(folder) / name / "model.onnx"
        if check.ok:
            _install(path.with_name("model.int8.onnx"), path)
            results[name] = (True, check)
            continue
        for f in path.parent.glob("model.int8.onnx*"):
            f.unlink()
        reason = (f"static int8 refused for {name}: final image PSNR {check.psnr_db:.1f} dB < {s.min_psnr_db} dB "
                  f"against the fp32 graphs (same seed); the fp32 {name} is kept")
        progress(reason)
        results[name] = (False, replace(check, not_run=reason))
    return results


def apply_static_int8(folder: Path, components, profile, graphs: dict, checks: list, progress) -> None:
    """convert's static-int8 step, once every graph is in `folder`: quantise the settings' graphs, update the
    manifest entries (and weight map) of those that passed, and record each PSNR gate among the checks."""
    from .onnx_io import custom_ops
    from .weight_map import write_weight_map

    for name, (installed, check) in static_int8(folder, profile, progress).items():
        checks.append(check)
        if not installed:
            continue
        where = Path(folder) / name
        graphs[name] |= {"precision": "int8", "custom_ops": custom_ops(where / "model.onnx"),
                         "data_file": f"{name}/{DATA_FILE}" if (where / DATA_FILE).exists() else None}
        if graphs[name].get("weight_map"):                      # int8 weights are listed as unmapped
            write_weight_map(where, components.modules[name], name)
