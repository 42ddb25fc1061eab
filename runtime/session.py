"""onnxruntime sessions per provider, and a graph wrapper that checks every input before it runs."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import graph_cache
from .errors import ModelFolderError, UserError
from .manifest import GraphInfo

OPENVINO = "OpenVINO"      # the openvino runtime itself (runtime.openvino_backend), not onnxruntime's OpenVINO EP
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "directml": "DmlExecutionProvider", "openvino": OPENVINO}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(double)": np.float64}
DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}
LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are built: providers in order, their options, and session settings."""
    providers: tuple                  # onnxruntime provider names, most preferred first
    provider_options: dict            # provider name -> options
    threads: int = 0                  # intra-op threads; 0 = onnxruntime's default
    level: str = "basic"
    execution_mode: str = "sequential"
    inter_op_threads: int = 1
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True   # off: activations go back to the OS after each call (lower peak RSS)
    io_binding: bool = False          # bind inputs/outputs explicitly; constant inputs stay on the device
    fixed_dims: bool = False          # pin symbolic dims per request shape (DirectML free-dimension overrides)
    fixed_buffers: bool = False       # inputs/outputs at fixed device addresses per shape (CUDA graph replay)
    graph_cache: str = ""             # CPU only: folder name for fully optimised graphs (runtime.graph_cache)

    @property
    def device(self) -> str:
        """Where the first provider keeps tensors, for IO binding."""
        return DEVICES.get(self.providers[0], "cpu")

    @property
    def backend(self) -> str:
        """The runtime that builds the sessions: 'openvino' for the OpenVINO provider, else 'onnxruntime'."""
        return "openvino" if self.providers[0] == OPENVINO else "onnxruntime"


def choose_providers(requested: str, target_provider: str, fallbacks: tuple = ()) -> tuple:
    """Provider list for `--provider` (auto = what the folder was built for, if this onnxruntime has it)."""
    from .openvino_backend import INSTALL, available as openvino_available

    available = ort.get_available_providers() + ([OPENVINO] if openvino_available() else [])
    if requested == "auto":
        wanted = [p for p in (target_provider, *fallbacks) if p in available] + ["CPUExecutionProvider"]
        return tuple(dict.fromkeys(wanted))
    if requested not in PROVIDERS:
        raise UserError(f"unknown provider {requested!r}; choose from auto, {', '.join(PROVIDERS)}")
    name = PROVIDERS[requested]
    if name == OPENVINO and name not in available:
        raise UserError(INSTALL)
    if name not in available:
        raise UserError(f"this onnxruntime has no {name} (available: {', '.join(available)}); "
                        f"install the matching onnxruntime package or use --provider cpu")
    return (name,) if name == "CPUExecutionProvider" else (name, "CPUExecutionProvider")


def make_session(path: Path, cfg: SessionConfig, info: GraphInfo | None, target: str,
                 dims: dict | None = None, initializers: dict | None = None) -> ort.InferenceSession:
    """Build one session (with `dims` pinned as free-dimension overrides), naming the target on failure.

    `initializers` (name -> array) replace the graph's own values at load (merged LoRA weights, runtime.lora)."""
    if cfg.backend == "openvino":                       # compiles per static shape itself: dims are not needed
        from .openvino_backend import OpenVINOSession
        return OpenVINOSession(path, cfg.provider_options.get(OPENVINO, {}), cfg.threads, info, target)
    opts = ort.SessionOptions()
    for axis, value in (dims or {}).items():
        opts.add_free_dimension_override_by_name(axis, int(value))
    opts.graph_optimization_level = LEVELS[cfg.level]
    opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = cfg.inter_op_threads
    opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if cfg.execution_mode == "parallel"
                           else ort.ExecutionMode.ORT_SEQUENTIAL)
    opts.enable_mem_pattern = cfg.enable_mem_pattern
    opts.enable_cpu_mem_arena = cfg.enable_cpu_mem_arena
    opts.log_severity_level = 3
    overrides = [(n, ort.OrtValue.ortvalue_from_numpy(a)) for n, a in (initializers or {}).items()]
    for name, value in overrides:                 # the session uses these buffers: kept alive on the session
        opts.add_initializer(name, value)
    if info is not None and info.custom_ops and info.provider not in cfg.providers:
        raise ModelFolderError(
            f"{path.parent.name} was built for target {target!r} ({info.provider}; needs "
            f"{', '.join(info.custom_ops[:4])}), which {', '.join(cfg.providers)} cannot run; "
            f"re-export with --target for this machine or pick --provider {_provider_key(info.provider)}")
    options = [engine_cache_options(cfg.provider_options.get(p, {})     # the folder's, then this graph's own
                                    | (info.provider_options if info and p == info.provider else {}), initializers)
               for p in cfg.providers]
    # onnxruntime's NCHWc layout pass reads Conv weights from the graph file, ignoring overrides: skip it then
    layout = {"disabled_optimizers": ["NchwcTransformer"]} if any(v.ndim == 4 for v in
                                                                  (initializers or {}).values()) else {}
    try:
        session = _load(path, opts, cfg, options, layout, _cache_entry(path, cfg, dims, initializers))
        session.initializer_overrides = overrides
        return session
    except Exception as e:  # onnxruntime raises its own exception types; all mean "cannot load this graph"
        msg = str(e).splitlines()[0][:300]
        hint = f" (built for target {target!r})" if "NOT_IMPLEMENTED" in str(e) or "kernel" in str(e) else ""
        raise ModelFolderError(f"cannot load {path}{hint}: {msg}") from None


def _cache_entry(path: Path, cfg: SessionConfig, dims: dict | None, initializers: dict | None):
    """The optimised-graph cache entry for a CPU-only session without replaced initializers, else None."""
    if not cfg.graph_cache or initializers or cfg.providers != ("CPUExecutionProvider",):
        return None
    try:
        return graph_cache.entry(path, cfg.graph_cache, cfg.level, dims)
    except OSError:
        return None


def _load(path: Path, opts, cfg: SessionConfig, options: list, layout: dict, cached):
    """The session: from the cached optimised graph when there is one, else from the graph (saving it)."""
    if cached is not None and cached.ready:
        opts.graph_optimization_level = LEVELS["disabled"]      # its transformations are in the file already
        try:
            session = ort.InferenceSession(str(cached.model), opts, providers=list(cfg.providers),
                                           provider_options=options)
            session.graph_cache = "hit"
            return session
        except Exception:  # a damaged or foreign entry: rebuild it from the graph
            cached.drop()
            opts.graph_optimization_level = LEVELS[cfg.level]
    try:
        staging = cached.staging() if cached is not None else None
    except OSError:           # an unwritable cache: build without saving
        staging = None
    if staging is not None:
        graph_cache.save_options(opts, staging)
    session = ort.InferenceSession(str(path), opts, providers=list(cfg.providers), provider_options=options,
                                   **layout)
    session.graph_cache = "stored" if staging is not None and cached.commit(staging) else "off"
    return session


def engine_cache_options(options: dict, initializers: dict | None) -> dict:
    """TensorRT names cached engines by the graph's path and structure, not its weights: a session with changed
    initializers (merged LoRA weights) gets its own engine cache folder, keyed by those weights, or it would load
    the engine built with the old ones. The engine is then built once per weight set (the timing cache is shared)."""
    if not initializers or not options.get("trt_engine_cache_enable"):
        return options
    digest = hashlib.sha256()
    for name in sorted(initializers):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(initializers[name]).data)
    base = Path(options.get("trt_engine_cache_path") or ".")
    return options | {"trt_engine_cache_path": str(base / f"weights-{digest.hexdigest()[:16]}")}


def _provider_key(provider: str) -> str:
    """`CUDAExecutionProvider` -> `cuda`."""
    return next((k for k, v in PROVIDERS.items() if v == provider), provider)


class Graph:
    """One ONNX graph: feeds are checked by name, dtype and shape against what the graph declares.

    With `fixed_dims`, a session is built per set of symbolic-dimension values (DirectML needs static shapes);
    with `io_binding`, inputs and outputs are bound explicitly and OrtValue inputs (see `on_device`) are used
    in place, so constant inputs such as text embeddings are uploaded once per request, not once per step.
    """

    def __init__(self, build, name: str, cfg: SessionConfig):
        self.build, self.name, self.cfg = build, name, cfg
        self.sessions, self.buffers = {}, {}
        session = self._session(())
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    @property
    def session(self) -> ort.InferenceSession:
        """The session without pinned dimensions (the one built on load)."""
        return self.sessions[()]

    def _session(self, key: tuple) -> ort.InferenceSession:
        """The session for one set of pinned dims (the () key: none pinned)."""
        if key not in self.sessions:
            self.sessions[key] = self.build(dict(key))
        return self.sessions[key]

    def input_rank(self, name: str) -> int:
        """Rank of a declared input."""
        return len(self.inputs[name].shape)

    def dtype(self, name: str) -> np.dtype:
        """The NumPy element type a declared input takes."""
        return np.dtype(ORT_TYPES[self.inputs[name].type])

    def cast(self, name: str, value) -> np.ndarray:
        """`value` as the declared element type of input `name`: for feeds the caller builds itself."""
        return np.asarray(value).astype(self.dtype(name), copy=False)

    def on_device(self, name: str, value: np.ndarray):
        """An input placed where the graph runs, to reuse across calls (a checked array without IO binding)."""
        value = self._checked(name, np.asarray(value))
        if self.cfg.fixed_buffers or not self.cfg.io_binding:      # fixed buffers copy every input in place
            return value
        return ort.OrtValue.ortvalue_from_numpy(value, self.cfg.device, 0)

    def _checked(self, name: str, value):
        """One feed, refused unless its shape and element type are what the graph declares (no silent casts)."""
        spec = self.inputs[name]
        if isinstance(value, ort.OrtValue):
            _check_shape(self.name, name, tuple(value.shape()), spec.shape)
            _check_dtype(self.name, name, _numpy_name(value.data_type()), _numpy_name(spec.type))
            return value
        value = np.asarray(value)
        _check_shape(self.name, name, value.shape, spec.shape)
        _check_dtype(self.name, name, value.dtype.name, _numpy_name(spec.type))
        return value

    def _dims(self, feeds: dict) -> tuple:
        """Symbolic dimension values implied by the feeds (empty unless dims are pinned)."""
        if not self.cfg.fixed_dims:
            return ()
        found = {}
        for name, value in feeds.items():
            shape = value.shape() if isinstance(value, ort.OrtValue) else value.shape
            found |= {d: n for d, n in zip(self.inputs[name].shape, shape) if isinstance(d, str)}
        return tuple(sorted(found.items()))

    def __call__(self, **feeds) -> dict:
        """Run with checked feeds; outputs as float32 (or their integer type) by name."""
        missing = set(self.inputs) - set(feeds)
        extra = set(feeds) - set(self.inputs)
        if missing or extra:
            raise ModelFolderError(f"{self.name}: graph inputs are {sorted(self.inputs)}, "
                                   f"got {sorted(feeds)} (a graph from a different exporter layout?)")
        checked = {name: self._checked(name, value) for name, value in feeds.items()}
        key = self._dims(checked)
        session = self._session(key)
        if self.cfg.fixed_buffers:
            outs = self._run_fixed(session, key, checked)
        elif self.cfg.io_binding:
            outs = self._run_bound(session, checked)
        else:
            outs = session.run(self.output_names, checked)
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in zip(self.output_names, outs)}

    def _run_bound(self, session, feeds: dict) -> list:
        """run_with_iobinding: arrays are copied in, OrtValues used where they are, outputs copied back."""
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.cfg.device)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _run_fixed(self, session, key: tuple, feeds: dict) -> list:
        """Copy inputs into buffers that never move and reuse the first run's outputs, as graph replay needs."""
        buffers = self.buffers.setdefault(key, {"in": {}, "out": None})
        binding = session.io_binding()
        for name, value in feeds.items():
            value = np.require(value, requirements="C")            # keeps rank 0, unlike ascontiguousarray
            if name in buffers["in"]:
                buffers["in"][name].update_inplace(value)
            else:
                buffers["in"][name] = ort.OrtValue.ortvalue_from_numpy(value, self.cfg.device, 0)
            binding.bind_ortvalue_input(name, buffers["in"][name])
        for i, name in enumerate(self.output_names):
            if buffers["out"] is None:
                binding.bind_output(name, self.cfg.device)
            else:
                binding.bind_ortvalue_output(name, buffers["out"][i])
        session.run_with_iobinding(binding)
        if buffers["out"] is None:
            buffers["out"] = binding.get_outputs()
        return [o.numpy() for o in buffers["out"]]


def _check_dtype(graph: str, name: str, got: str, declared: str) -> None:
    """The element type (NumPy names) must be the declared one."""
    if got != declared:
        raise UserError(f"{graph}: input {name} has dtype {got}, the graph expects {declared}")


def _numpy_name(ort_type: str) -> str:
    """onnxruntime's type string as a NumPy dtype name: `tensor(float)` -> `float32`."""
    return np.dtype(ORT_TYPES[ort_type]).name if ort_type in ORT_TYPES else ort_type


def _check_shape(graph: str, name: str, got: tuple, declared: list) -> None:
    """Rank must match, and fixed dimensions must be equal."""
    if len(got) != len(declared) or any(isinstance(d, int) and d != g for d, g in zip(declared, got)):
        raise ModelFolderError(f"{graph}: input {name} has shape {list(got)}, the graph expects {declared}")
