"""Model sources: an alias, a local diffusers folder, a single-file checkpoint or a built-in tiny model,
resolved to a diffusers folder and loaded as the torch modules the component specs name."""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import UserError
from runtime.layout import DENOISERS, T5_ENCODER, TEXT_ENCODERS

from .cache import cache_dir, quiet_libraries
from .licence import BUILT_IN, UNKNOWN, checkpoint_licence, folder_licence
from .specs import component_specs, source_classes

ALIASES_FILE = Path(__file__).parent / "data" / "aliases.json"
REQUIRED = ("vae", "scheduler")        # and one of DENOISERS


@dataclass(frozen=True)
class Source:
    """Where a model came from, as recorded in the manifest."""
    spec: str
    kind: str                 # "tiny" | "alias" | "folder" | "single_file"
    folder: Path
    repo_id: str | None = None
    license: str = UNKNOWN

    def to_dict(self) -> dict:
        """The manifest's `source` entry."""
        return {"spec": self.spec, "kind": self.kind, "repo_id": self.repo_id, "folder": str(self.folder)}


@dataclass
class Components:
    """The loaded PyTorch modules and config files of one pipeline."""
    source: Source
    model_index: dict
    modules: dict                                  # source component folder -> loaded torch module
    scheduler_config: dict
    configs: dict = field(default_factory=dict)    # source component folder -> its config.json dict
    overrides: dict = field(default_factory=dict)  # component -> folder it was replaced from
    controlnets: dict = field(default_factory=dict)  # ControlNet graph name -> {"spec": --controlnet, "folder"}

    def module(self, spec) -> object:
        """The loaded torch module a spec wraps."""
        return self.modules[spec.module]


def aliases() -> dict:
    """The alias table: name -> {repo_id, license}."""
    return {k: v for k, v in json.loads(ALIASES_FILE.read_text()).items() if not k.startswith("_")}


def resolve(spec: str, license: str | None = None) -> Source:
    """Turn a --model value into a local diffusers folder, with its licence (`license` overrides what is found)."""
    source = _resolve(spec)
    if license:
        return Source(source.spec, source.kind, source.folder, source.repo_id, license)
    return source


def _resolve(spec: str) -> Source:
    """The Source of a --model value, licence read from the alias table or the folder's model card."""
    from .tiny import VARIANTS, tiny_folder

    if spec in VARIANTS:
        return Source(spec, "tiny", tiny_folder(spec), license=BUILT_IN)
    table = aliases()
    if spec in table:
        repo_id = table[spec]["repo_id"]
        return Source(spec, "alias", _download(repo_id), repo_id, table[spec].get("license", UNKNOWN))
    path = Path(spec).expanduser()
    from .single_file import is_single_file, to_diffusers_folder

    if path.is_file() and is_single_file(path):
        folder = to_diffusers_folder(path.resolve(), cache_dir() / "single_file")
        return Source(spec, "single_file", folder, license=checkpoint_licence(path))
    if not path.exists():
        raise UserError(f"model {spec!r} is neither a known alias ({', '.join(sorted(table) + sorted(VARIANTS))}) "
                        "nor an existing folder")
    if not path.is_dir():
        raise UserError(f"model {spec!r} is a file but not a .safetensors/.ckpt checkpoint; "
                        "pass a checkpoint or a diffusers folder (with model_index.json)")
    return Source(spec, "folder", path.resolve(), license=folder_licence(path))


PIPELINE_FILES = ("model_index.json", "README.md", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors")


def _download(repo_id: str, patterns: tuple = PIPELINE_FILES, flag: str = "--model") -> Path:
    """Fetch (or find in the local cache) the diffusers files of a hub repo."""
    from huggingface_hub import snapshot_download

    patterns = list(patterns)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing cache: all end the same way for the user
        raise UserError(f"could not load {repo_id} from the Hugging Face hub or its local cache "
                        f"({type(e).__name__}); download it elsewhere and pass {flag} path/to/folder") from None


def check_folder(folder: Path) -> dict:
    """Validate that a folder is a Stable Diffusion pipeline; return its model_index."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder: no model_index.json")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index_path}: not valid JSON ({e})") from None
    missing = [c for c in REQUIRED if not present(index, c)]
    denoiser = next((d for d in DENOISERS if present(index, d)), None)
    if denoiser is None:
        missing.append(" or ".join(DENOISERS))
    if not any(present(index, te) for te, _ in TEXT_ENCODERS):
        missing.append("text_encoder")
    if missing:
        raise UserError(f"{folder} is not a Stable Diffusion pipeline: model_index.json lacks {', '.join(missing)}")
    pairs = (*TEXT_ENCODERS, T5_ENCODER)
    needed = [*REQUIRED, denoiser] + [c for pair in pairs if present(index, pair[0]) for c in pair]
    for c in needed:
        if not (folder / c).is_dir():
            raise UserError(f"{folder}: component folder {c}/ is missing")
    for _, tok in TEXT_ENCODERS:
        t = folder / tok
        if t.is_dir() and not (t / "tokenizer.json").is_file():
            for f in ("vocab.json", "merges.txt"):
                if not (t / f).is_file():
                    raise UserError(f"{folder}: {tok}/{f} is missing (a CLIP tokenizer needs vocab.json and merges.txt)")
    if present(index, T5_ENCODER[0]) and not (folder / T5_ENCODER[1] / "tokenizer.json").is_file():
        raise UserError(f"{folder}: {T5_ENCODER[1]}/tokenizer.json is missing (the runtime reads the T5 tokenizer "
                        "from tokenizer.json; transformers' T5TokenizerFast.save_pretrained writes it)")
    return index


def present(index: dict, component: str) -> bool:
    """Whether model_index.json names a component (entries like [null, null] mean absent)."""
    entry = index.get(component)
    return isinstance(entry, list) and entry[0] is not None


def component_folder(path: str, name: str) -> Path:
    """An override's folder: the component folder itself (with config.json) or a pipeline folder holding it."""
    p = Path(path).expanduser()
    for candidate in (p, p / name):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"--{name.replace('_', '-')} {path}: no config.json there or in {name}/ below it")


def load_components(source: Source, overrides: dict | None = None) -> Components:
    """Load every module the model's specs wrap in fp32, refusing partial weight loads; apply overrides."""
    folder = source.folder
    index = check_folder(folder)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise UserError(f"{folder}: scheduler/scheduler_config.json is missing")
    names = [c for c in source_classes() if present(index, c)]
    configs = {c: _read_config(folder / c) for c in names}
    replaced = {}
    for name, path in (overrides or {}).items():
        if path is None:
            continue
        if name not in configs:
            raise UserError(f"--{name.replace('_', '-')}: this model has no {name} to replace")
        replaced[name] = component_folder(path, name)
        configs[name] = _read_config(replaced[name])
    classes = {spec.module: spec.source_class for spec in component_specs(configs)}   # SD3: CLIP with projection
    modules = {name: _load(cls, replaced.get(name, folder / name), name) for name, cls in classes.items()}
    return Components(source, index, modules, json.loads(sched_path.read_text()), configs,
                      {k: str(v.resolve()) for k, v in replaced.items()})


def _read_config(folder: Path) -> dict:
    """A component's config.json, or a one-line error."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: config.json is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _load(class_path: str, path: Path, name: str):
    """from_pretrained of "package.Class" with a one-line error and a refusal of missing or mismatched weights."""
    package, cls_name = class_path.rsplit(".", 1)
    quiet_libraries()
    cls = getattr(importlib.import_module(package), cls_name)
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True)
    except Exception as e:
        raise UserError(f"could not load {name} from {path}: {str(e).splitlines()[0][:300]}") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        first = sorted(map(str, next(iter(bad.values()))))[:3]
        raise UserError(f"{name} at {path}: checkpoint does not match its config ({', '.join(bad)}: "
                        f"{', '.join(first)}...); refusing to export random weights")
    return model.eval().float().requires_grad_(False)
