"""onnxruntime sessions per provider, and a graph wrapper that checks every input before it runs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import ModelFolderError, UserError
from .manifest import GraphInfo

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "directml": "DmlExecutionProvider"}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(double)": np.float64}
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


def choose_providers(requested: str, target_provider: str, fallbacks: tuple = ()) -> tuple:
    """Provider list for `--provider` (auto = what the folder was built for, if this onnxruntime has it)."""
    available = ort.get_available_providers()
    if requested == "auto":
        wanted = [p for p in (target_provider, *fallbacks) if p in available] + ["CPUExecutionProvider"]
        return tuple(dict.fromkeys(wanted))
    if requested not in PROVIDERS:
        raise UserError(f"unknown provider {requested!r}; choose from auto, {', '.join(PROVIDERS)}")
    name = PROVIDERS[requested]
    if name not in available:
        raise UserError(f"this onnxruntime has no {name} (available: {', '.join(available)}); "
                        f"install the matching onnxruntime package or use --provider cpu")
    return (name,) if name == "CPUExecutionProvider" else (name, "CPUExecutionProvider")


def make_session(path: Path, cfg: SessionConfig, info: GraphInfo | None, target: str) -> ort.InferenceSession:
    """Build one session, turning a missing-kernel failure into a message naming the graph's target."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[cfg.level]
    opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = cfg.inter_op_threads
    opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if cfg.execution_mode == "parallel"
                           else ort.ExecutionMode.ORT_SEQUENTIAL)
    opts.enable_mem_pattern = cfg.enable_mem_pattern
    opts.log_severity_level = 3
    if info is not None and info.custom_ops and info.provider not in cfg.providers:
        raise ModelFolderError(
            f"{path.parent.name} was built for target {target!r} ({info.provider}; needs "
            f"{', '.join(info.custom_ops[:4])}), which {', '.join(cfg.providers)} cannot run; "
            f"re-export with --target for this machine or pick --provider {_provider_key(info.provider)}")
    options = [cfg.provider_options.get(p, {}) for p in cfg.providers]
    try:
        return ort.InferenceSession(str(path), opts, providers=list(cfg.providers), provider_options=options)
    except Exception as e:  # onnxruntime raises its own exception types; all mean "cannot load this graph"
        msg = str(e).splitlines()[0][:300]
        hint = f" (built for target {target!r})" if "NOT_IMPLEMENTED" in str(e) or "kernel" in str(e) else ""
        raise ModelFolderError(f"cannot load {path}{hint}: {msg}") from None


def _provider_key(provider: str) -> str:
    """`CUDAExecutionProvider` -> `cuda`."""
    return next((k for k, v in PROVIDERS.items() if v == provider), provider)


class Graph:
    """One ONNX graph: feeds are checked by name, dtype and shape, then cast to what the graph declares."""

    def __init__(self, session: ort.InferenceSession, name: str):
        self.session, self.name = session, name
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    def input_rank(self, name: str) -> int:
        """Rank of a declared input."""
        return len(self.inputs[name].shape)

    def input_dtype(self, name: str):
        """NumPy dtype of a declared input."""
        return ORT_TYPES[self.inputs[name].type]

    def __call__(self, **feeds) -> dict:
        """Run with checked feeds; outputs as float32 (or their integer type) by name."""
        missing = set(self.inputs) - set(feeds)
        extra = set(feeds) - set(self.inputs)
        if missing or extra:
            raise ModelFolderError(f"{self.name}: graph inputs are {sorted(self.inputs)}, "
                                   f"got {sorted(feeds)} (a graph from a different exporter layout?)")
        cast = {}
        for name, value in feeds.items():
            spec = self.inputs[name]
            value = np.asarray(value)
            _check_shape(self.name, name, value.shape, spec.shape)
            cast[name] = value.astype(ORT_TYPES[spec.type], copy=False)
        outs = self.session.run(self.output_names, cast)
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in zip(self.output_names, outs)}


def _check_shape(graph: str, name: str, got: tuple, declared: list) -> None:
    """Rank must match, and fixed dimensions must be equal."""
    if len(got) != len(declared) or any(isinstance(d, int) and d != g for d, g in zip(declared, got)):
        raise ModelFolderError(f"{graph}: input {name} has shape {list(got)}, the graph expects {declared}")
