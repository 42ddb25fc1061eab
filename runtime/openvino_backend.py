"""The OpenVINO runtime behind runtime.session's interface: one compiled model per static shape, LRU-cached.

References: OpenVINO's Python API (Core.read_model / Model.reshape / Core.compile_model, properties
INFERENCE_PRECISION_HINT, PERFORMANCE_HINT, NUM_STREAMS, INFERENCE_NUM_THREADS, CACHE_DIR). Only imported when
a graph runs on the `openvino` provider; needs `pip install "sdexport[openvino]"` (no PyTorch).
"""
from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelFolderError, UserError
from .graph_cache import Entry, cache_location
from .openvino_weights import lowered, runs_bf16
from .session import OPENVINO as PROVIDER
READS = (PROVIDER, "CPUExecutionProvider")   # graphs whose contrib ops OpenVINO's ONNX frontend converts
INSTALL = '--provider openvino needs the openvino runtime: pip install "sdexport[openvino]"'
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}    # --precision -> INFERENCE_PRECISION_HINT
OWN_KEYS = ("device", "cache_dir", "compiled_shapes", "f32_graphs")   # provider options we read; the rest go to OpenVINO
# Graphs compiled at f32 whatever the hint: OpenVINO 2026.4's bf16 CLIP text encoder returns NaN for batches of
# two or more prompts (measured on AMX; one prompt is fine), and the text encoders cost ~1% of a generation.
F32_GRAPHS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_WARNED = set()                     # (device, precision) pairs already warned about in this process
_ORT_NAMES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
              np.dtype(np.int64): "tensor(int64)", np.dtype(np.int32): "tensor(int32)",
              np.dtype(np.float64): "tensor(double)"}


def _openvino():
    """The openvino module, or a one-line error saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise UserError(INSTALL) from None
    return openvino


def available() -> bool:
    """Whether the openvino runtime is importable here (without importing it)."""
    from importlib.util import find_spec

    return find_spec("openvino") is not None


@dataclass(frozen=True)
class _Port:
    """A graph input or output as onnxruntime describes it: name, shape (str = free), `tensor(...)` type."""
    name: str
    shape: list
    type: str


def _port(node, position: int) -> _Port:
    """An OpenVINO model port as a _Port; dynamic dimensions get a name so they count as free."""
    dims = [d.get_length() if d.is_static else f"{node.get_any_name()}_{i}"
            for i, d in enumerate(node.get_partial_shape())]
    return _Port(node.get_any_name(), dims, _ORT_NAMES.get(node.get_element_type().to_dtype(), "unknown"))


def compile_config(options: dict, threads: int, folder: Path) -> dict:
    """OpenVINO properties for compile_model from the profile's provider options, --threads and --precision."""
    config = {k: v for k, v in options.items() if k not in OWN_KEYS and v not in ("", None)}
    hint = config.get("INFERENCE_PRECISION_HINT")
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = PRECISIONS.get(hint, hint)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    cache = cache_location(folder, options.get("cache_dir", "ov_cache"), "openvino")
    if cache:
        config["CACHE_DIR"] = cache
    return {k: str(v) if not isinstance(v, str) else v for k, v in config.items()}


def refuse_unreadable(path: Path, info, target: str, error: Exception) -> ModelFolderError:
    """The one-line refusal for a graph OpenVINO cannot convert, naming the target it was built for."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    why = next((ln.lstrip("- ").split(" with a message")[0] for ln in lines if ln.startswith("-- ")), lines[-1])
    built = f" was built for target {target!r} ({info.provider}" if info is not None else " ("
    ops = f"; needs {', '.join(info.custom_ops[:4])}" if info is not None and info.custom_ops else ""
    return ModelFolderError(f"{path.parent.name}{built}{ops}), which OpenVINO cannot read ({why[:160]}); "
                            f"re-export with --target openvino or pick the provider it was built for")


class OpenVINOSession:
    """One ONNX graph read by OpenVINO, compiled per static input shape; `run` as onnxruntime's session."""

    def __init__(self, path: Path, options: dict, threads: int, info=None, target: str = "unknown"):
        ov = _openvino()
        if info is not None and info.custom_ops and info.provider not in READS:
            raise refuse_unreadable(path, info, target, RuntimeError("its contrib ops have no OpenVINO conversion"))
        self.core = ov.Core()
        self.device = str(options.get("device", "CPU"))
        self.config = compile_config(options, threads, path.parent.parent)
        if path.parent.name in options.get("f32_graphs", F32_GRAPHS):
            self.config["INFERENCE_PRECISION_HINT"] = "f32"
        self.capacity = max(1, int(options.get("compiled_shapes", 2)))
        self.path = self.source = path      # source: the file compiled (the ONNX graph or its bf16-weight IR)
        try:
            self.model = self.core.read_model(str(path))   # dropped once compiled (its weights: GBs), re-read per shape
        except RuntimeError as e:
            raise refuse_unreadable(path, info, target, e) from None
        self.weights = "f32"          # what the compiled models hold beside the packed weights: "f32" or "bf16"
        if runs_bf16(self.core, self.device, self.config):
            self._read_bf16_weights(self.config.get("CACHE_DIR", ""))     # the one cache folder, '' when off
        self.inputs = [_port(n, i) for i, n in enumerate(self.model.inputs)]
        self.outputs = [_port(n, i) for i, n in enumerate(self.model.outputs)]
        self.compiled = OrderedDict()      # input shapes -> (compiled model, infer request), least recent first
        self.lock = threading.Lock()
        self.compile_s = 0.0               # seconds spent compiling (first use of each shape; less with CACHE_DIR)
        self.name = path.parent.name

    def _read_bf16_weights(self, where: str) -> None:
        """Compile from the graph's bf16-weight IR (runtime.openvino_weights; half the resident weights, the same
        output) instead of the ONNX graph. Compiles from it skip CACHE_DIR: a warm cache saves ~0.4 s of the UNet's
        compile and raises its peak by 1.5 GB (hashing the model reads every weight)."""
        source = lowered(self.core, self.path, where)
        if source is None:
            return
        try:
            model = self.core.read_model(str(source))
        except RuntimeError:          # a damaged entry: dropped (rebuilt by the next session), the ONNX graph kept
            Entry(source.parent, source.name).drop()
            return
        self.model, self.source, self.weights = model, source, "bf16"
        self.config.pop("CACHE_DIR", None)

    def get_inputs(self) -> list:
        """Declared inputs (onnxruntime's NodeArg fields: name, shape, type)."""
        return self.inputs

    def get_outputs(self) -> list:
        """Declared outputs, in graph order."""
        return self.outputs

    def get_providers(self) -> list:
        """The provider that runs this graph."""
        return [PROVIDER]

    @property
    def precision(self) -> str:
        """The inference precision OpenVINO chose for the most recent compiled shape ('' before the first)."""
        if not self.compiled:
            return ""
        return next(reversed(self.compiled.values()))[0].get_property("INFERENCE_PRECISION_HINT").to_string()

    def _request(self, key: tuple):
        """The infer request for one set of input shapes: compiled on first use, least recently used evicted."""
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return self.compiled[key][1]
        start = time.perf_counter()
        model, self.model = self.model or self.core.read_model(str(self.source)), None
        model.reshape({p.name: list(shape) for p, shape in zip(self.inputs, key)})   # static shape
        try:
            compiled = self.core.compile_model(model, self.device, self.config)
        except RuntimeError as e:
            raise ModelFolderError(f"{self.name}: OpenVINO cannot compile it on {self.device} ({_last_line(e)})"
                                   ) from None
        del model              # the compiled model holds what it needs; peak RSS no longer counts the read copy
        self.compile_s += time.perf_counter() - start
        self._check_precision(compiled)
        self.compiled[key] = (compiled, compiled.create_infer_request())
        while len(self.compiled) > self.capacity:
            self.compiled.popitem(last=False)
        return self.compiled[key][1]

    def _check_precision(self, compiled) -> None:
        """Warn once when the requested precision hint is not what the device runs (bf16 on a CPU without it)."""
        wanted = self.config.get("INFERENCE_PRECISION_HINT")
        got = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()       # "f32", "bf16", "f16"
        if wanted and wanted != got and (self.device, wanted) not in _WARNED:
            _WARNED.add((self.device, wanted))
            warnings.warn(f"{self.device} has no native {wanted} (capabilities: "
                          f"{', '.join(self.core.get_property(self.device, 'OPTIMIZATION_CAPABILITIES'))}); "
                          f"OpenVINO runs {got} instead")

    def run(self, output_names: list, feeds: dict) -> list:
        """Outputs (NumPy copies) for checked feeds, by output name."""
        key = tuple(tuple(np.shape(feeds[p.name])) for p in self.inputs)
        with self.lock:
            request = self._request(key)
            try:      # np.require keeps rank 0 (a scalar timestep), unlike ascontiguousarray
                result = request.infer({p.name: np.require(feeds[p.name], requirements="C") for p in self.inputs},
                                       share_inputs=True)
            except RuntimeError as e:
                raise ModelFolderError(f"{self.name}: OpenVINO failed to run it ({_last_line(e)})") from None
            by_name = {p.name: np.array(v) for p, v in zip(self.outputs, result.values())}
        return [by_name[n] for n in output_names]

    def release(self) -> None:
        """Free the compiled models (the graph file is read again if it is needed after this)."""
        with self.lock:
            self.compiled.clear()


def _last_line(error: Exception) -> str:
    """The informative last line of an OpenVINO exception (its first lines are source locations)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]
