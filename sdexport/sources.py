"""Model sources: an alias, a local diffusers folder, or the built-in `tiny`, resolved to loaded modules."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import UserError

ALIASES_FILE = Path(__file__).parent / "data" / "aliases.json"
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class Source:
    """Where a model came from, as recorded in the manifest."""
    spec: str
    kind: str                 # "tiny" | "alias" | "folder"
    folder: Path
    repo_id: str | None = None

    def to_dict(self) -> dict:
        """The manifest's `source` entry."""
        return {"spec": self.spec, "kind": self.kind, "repo_id": self.repo_id, "folder": str(self.folder)}


@dataclass
class Components:
    """The loaded PyTorch modules and config files of one pipeline."""
    source: Source
    model_index: dict
    text_encoder: object
    unet: object
    vae: object
    scheduler_config: dict
    configs: dict = field(default_factory=dict)   # component folder -> its config.json dict


def aliases() -> dict:
    """The alias table: name -> {repo_id, family}."""
    return json.loads(ALIASES_FILE.read_text())


def resolve(spec: str) -> Source:
    """Turn a --model value into a local diffusers folder."""
    if spec == "tiny":
        from .tiny import tiny_folder
        return Source(spec, "tiny", tiny_folder())
    table = aliases()
    if spec in table:
        repo_id = table[spec]["repo_id"]
        return Source(spec, "alias", _download(repo_id), repo_id)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"model {spec!r} is neither a known alias ({', '.join(sorted(table))}, tiny) "
                        "nor an existing folder")
    if not path.is_dir():
        raise UserError(f"model {spec!r} is a file; pass a diffusers folder (with model_index.json)")
    return Source(spec, "folder", path.resolve())


def _download(repo_id: str) -> Path:
    """Fetch (or find in the local cache) the diffusers files of a hub repo."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing cache: all end the same way for the user
        raise UserError(f"could not load {repo_id} from the Hugging Face hub or its local cache "
                        f"({type(e).__name__}); download it elsewhere and pass --model path/to/folder") from None


def check_folder(folder: Path) -> dict:
    """Validate that a folder is a Stable Diffusion pipeline; return its model_index."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder: no model_index.json")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index_path}: not valid JSON ({e})") from None
    missing = [c for c in REQUIRED if not isinstance(index.get(c), list) or index[c][0] is None]
    if missing:
        raise UserError(f"{folder} is not a Stable Diffusion pipeline: model_index.json lacks {', '.join(missing)}")
    for c in REQUIRED:
        if not (folder / c).is_dir():
            raise UserError(f"{folder}: component folder {c}/ is missing")
    return index


def load_components(source: Source) -> Components:
    """Load the text encoder, UNet and VAE in fp32, refusing partial weight loads."""
    folder = source.folder
    index = check_folder(folder)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    text_encoder = _load(CLIPTextModel, folder / "text_encoder", "text_encoder")
    unet = _load(UNet2DConditionModel, folder / "unet", "unet")
    vae = _load(AutoencoderKL, folder / "vae", "vae")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise UserError(f"{folder}: scheduler/scheduler_config.json is missing")
    configs = {c: json.loads((folder / c / "config.json").read_text()) for c in ("text_encoder", "unet", "vae")}
    return Components(source, index, text_encoder, unet, vae, json.loads(sched_path.read_text()), configs)


def _load(cls, path: Path, name: str):
    """from_pretrained with a one-line error and a refusal of missing or mismatched weights."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: config.json is missing")
    quiet_libraries()
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


def quiet_libraries() -> None:
    """Silence the loading progress bars and info logs of transformers and diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
