"""Loading an exported folder (ours, or one written by Optimum's exporter) into lazily built graphs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFolderError, UserError
from .layout import DENOISERS, T5_ENCODER, TEXT_ENCODERS, vae_scale_factor
from .manifest import Manifest, check_files, read_manifest
from .session import OPENVINO, Graph, SessionConfig, choose_providers, make_session
from .tokenizer import ClipTokenizer

REQUIRED = ("vae_decoder",)          # and one of DENOISERS


@dataclass(frozen=True)
class ModelFacts:
    """What the pipeline needs to know, read from the folder's own config files."""
    scaling_factor: float
    vae_scale_factor: int
    unet_in_channels: int
    latent_channels: int
    sample_size: int                 # latent cells; default image size = sample_size * vae_scale_factor
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool = False   # SDXL: no negative prompt -> zero negative conditioning
    denoiser: str = "unet"           # the denoising graph: "unet", or SD3's "transformer"
    shift_factor: float = 0.0        # SD3's VAE: latents = (z - shift_factor) * scaling_factor
    patch_size: int = 1              # SD3's transformer: latent cells per token side
    latent_multiple: int = 1         # latent sizes the denoiser takes: UNets halve them once per extra block

    @property
    def default_size(self) -> int:
        """Default image height/width in pixels."""
        return self.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sizes (pixels) must be multiples of this: 64 for SD 1.x/2.x/SDXL UNets."""
        return self.vae_scale_factor * self.latent_multiple


def _read_json(path: Path) -> dict:
    """A config file's JSON object, or a one-line error naming it."""
    if not path.is_file():
        raise ModelFolderError(f"{path.parent.parent}: missing {path.parent.name}/{path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_facts(folder: Path) -> ModelFacts:
    """Scaling factor, latent geometry and scheduler settings from the component configs."""
    vae = _read_json(folder / "vae_decoder" / "config.json")
    denoiser = denoiser_name(folder)
    unet = _read_json(folder / denoiser / "config.json")
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    try:
        return ModelFacts(
            scaling_factor=float(vae.get("scaling_factor", 0.18215)), vae_scale_factor=vae_scale_factor(vae),
            unet_in_channels=int(unet["in_channels"]), latent_channels=int(vae.get("latent_channels", 4)),
            sample_size=int(unet.get("sample_size", 64)), scheduler_config=scheduler,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)), denoiser=denoiser,
            shift_factor=float(vae.get("shift_factor") or 0.0), patch_size=int(unet.get("patch_size", 1)),
            latent_multiple=_latent_multiple(unet))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{folder}: {denoiser}/config.json or vae_decoder/config.json has a missing or "
                               f"malformed value ({type(e).__name__}: {e})") from None


def _latent_multiple(denoiser: dict) -> int:
    """A traced UNet upsamples by exactly 2 per block (diffusers' odd-size path is not in the graph): its latents
    must divide by 2 ** (blocks - 1); a transformer's by its patch size."""
    if "block_out_channels" in denoiser:
        return 2 ** (len(denoiser["block_out_channels"]) - 1)
    return int(denoiser.get("patch_size", 1))


def denoiser_name(folder: Path) -> str:
    """The folder's denoising graph by layout: transformer/ (SD3) when present, else unet/."""
    return next((d for d in reversed(DENOISERS) if (Path(folder) / d / "model.onnx").is_file()), DENOISERS[0])


@dataclass
class Model:
    """An opened model folder: manifest, facts, tokenizer, and graphs built on first use."""
    folder: Path
    manifest: Manifest | None
    facts: ModelFacts
    tokenizers: dict                 # "tokenizer" / "tokenizer_2" -> ClipTokenizer
    session_config: SessionConfig
    _graphs: dict = field(default_factory=dict)
    overlay: dict = field(default_factory=dict)     # name -> Graph used instead (merged LoRA weights, runtime.lora)
    one_shot: bool = False           # one request per process (the CLI): sessions are released once done with

    def release(self, keep: tuple = (), only: tuple | None = None) -> None:
        """Drop the built sessions except `keep` (or just those in `only`), freeing their weights and arenas;
        they are rebuilt if used again."""
        for name in [n for n in self._graphs if n not in keep and (only is None or n in only)]:
            del self._graphs[name]

    @property
    def target(self) -> str:
        """The target the folder was built for ('unknown' for folders without a manifest)."""
        return self.manifest.target if self.manifest else "unknown"

    def has(self, name: str) -> bool:
        """Whether the folder contains a graph."""
        return (self.folder / name / "model.onnx").is_file()

    def graph(self, name: str) -> Graph:
        """The session for one graph, created on first use."""
        if name in self.overlay:
            return self.overlay[name]
        if name not in self._graphs:
            if not self.has(name):
                raise ModelFolderError(f"{self.folder}: no {name}/model.onnx (needed for this request)")
            self._graphs[name] = self.graph_with(name, None)
        return self._graphs[name]

    def graph_with(self, name: str, initializers: dict | None) -> Graph:
        """A new Graph of one of the folder's graphs whose sessions replace `initializers` (name -> array: merged
        LoRA weights, an extended token table); `graph.initializers` keeps them for later overrides."""
        info = self.manifest.graphs.get(name) if self.manifest else None
        path = self.folder / name / "model.onnx"
        graph = Graph(lambda dims: make_session(path, self.session_config, info, self.target, dims, initializers),
                      name, self.session_config)
        graph.initializers = initializers
        return graph

    def check_size(self, height: int, width: int) -> None:
        """Refuse image sizes outside the exported range or that the denoiser cannot take (positive multiples of its
        size multiple)."""
        if self.manifest and height > 0 and width > 0:
            self.manifest.check_axis("height", height)
            self.manifest.check_axis("width", width)
        m = self.facts.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise UserError(f"width and height must be positive multiples of {m} for this model, got {width}x{height}")

    def check_shape(self, batch: int, height: int, width: int) -> None:
        """Refuse sizes the denoiser cannot take or outside the exported ranges."""
        if self.manifest:
            self.manifest.check_shape(batch, height, width)
        self.check_size(height, width)


def open_model(folder: Path, provider: str = "auto", threads: int = 0, verify: bool = True,
               io_binding: bool = True, precision: str | None = None, one_shot: bool = False) -> Model:
    """Open a folder: validate the manifest and file hashes, read configs, prepare sessions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    manifest = read_manifest(folder)
    encoders = [(e, t) for e, t in TEXT_ENCODERS if (folder / e / "model.onnx").is_file()]
    for name in (denoiser_name(folder), *REQUIRED) + (() if encoders else ("text_encoder",)):
        if not (folder / name / "model.onnx").is_file():
            raise ModelFolderError(f"{folder}: missing {name}/model.onnx (not an exported Stable Diffusion folder?)")
    if manifest is not None:
        check_files(folder, manifest, hashes=verify)
    target_provider = next(iter(manifest.graphs.values())).provider if manifest else "CPUExecutionProvider"
    session = manifest.session if manifest else {}
    options = {target_provider: _resolve_paths(manifest.provider_options, folder)} if manifest else {}
    providers = choose_providers(provider, target_provider, tuple(session.get("fallback_providers", ())))
    io_binding = io_binding and providers[0] != OPENVINO        # OpenVINO takes host arrays, compiles per shape
    if precision is not None:
        options = _with_precision(options, providers[0], precision)
    cuda_graph = bool(session.get("cuda_graph", False)) and io_binding      # static shapes, replayed per shape
    if cuda_graph and "CUDAExecutionProvider" in options:
        options["CUDAExecutionProvider"] = options["CUDAExecutionProvider"] | {"enable_cuda_graph": "1"}
    cfg = SessionConfig(
        providers=providers, provider_options=options, threads=threads or int(session.get("intra_op_num_threads", 0)),
        level=session.get("graph_optimization_level", "basic" if manifest else "all"),
        execution_mode=session.get("execution_mode", "sequential"),
        inter_op_threads=int(session.get("inter_op_num_threads", 1)),
        enable_mem_pattern=bool(session.get("enable_mem_pattern", True)),
        enable_cpu_mem_arena=bool(session.get("enable_cpu_mem_arena", True)),
        io_binding=bool(session.get("io_binding", False)) and io_binding,
        fixed_dims=bool(session.get("free_dimension_overrides", False)) and providers[0] != OPENVINO or cuda_graph,
        fixed_buffers=cuda_graph, graph_cache=str(session.get("graph_cache", "")))
    try:
        tokenizers = {t: ClipTokenizer.from_folder(folder / t) for _, t in encoders}
        if (folder / T5_ENCODER[0] / "model.onnx").is_file():
            from .t5_tokenizer import T5Tokenizer
            tokenizers[T5_ENCODER[1]] = T5Tokenizer.from_folder(folder / T5_ENCODER[1])
    except ValueError as e:
        raise ModelFolderError(str(e)) from None
    return Model(folder, manifest, read_facts(folder), tokenizers, cfg, one_shot=one_shot)


def _with_precision(options: dict, provider: str, precision: str) -> dict:
    """Provider options with `--precision` as OpenVINO's inference precision hint (the one backend that takes it)."""
    if provider != OPENVINO:
        raise UserError(f"--precision {precision} applies to --provider openvino; onnxruntime runs each graph "
                        "in the precision it was exported in")
    return options | {OPENVINO: options.get(OPENVINO, {}) | {"INFERENCE_PRECISION_HINT": precision}}


def _resolve_paths(options: dict, folder: Path) -> dict:
    """Provider options ending in `_path` are relative to the model folder."""
    return {k: str(folder / v) if k.endswith("_path") and not Path(str(v)).is_absolute() else v
            for k, v in options.items()}
