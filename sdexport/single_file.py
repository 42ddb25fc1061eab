"""Single-file checkpoints (.safetensors / .ckpt, original CompVis or SGM key layout) as diffusers folders."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError

from .cache import cached_folder
from .checkpoint_io import Mismatch, count, only, save_component, strip, write_json
from .single_file_text import TextEncoder, write_text_encoder

CONVERTER_VERSION = 1     # bump when the conversion below changes: part of the cache key
DATA = Path(__file__).parent / "data" / "single_file"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SUFFIXES = (".safetensors", ".ckpt")
PREDICTION_TYPES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                    "sample": "sample"}
HASHED_BYTES = 1 << 20


@dataclass(frozen=True)
class Family:
    """A checkpoint family: how to recognise it and how its attention heads are sized."""
    name: str
    marker: str                  # a key prefix only this family's checkpoints have
    texts: tuple
    head_channels: int | None    # attention_head_dim = channels // head_channels per block (None: config's value)
    time_ids: int = 0            # SDXL micro-conditioning values (original size, crop, target size / aesthetic score)


FAMILIES = (
    Family("sdxl_base", "conditioner.embedders.1.model.", (
        TextEncoder("text_encoder", "conditioner.embedders.0.transformer.", False),
        TextEncoder("text_encoder_2", "conditioner.embedders.1.model.", True)), 64, time_ids=6),
    Family("sdxl_refiner", "conditioner.embedders.0.model.", (
        TextEncoder("text_encoder_2", "conditioner.embedders.0.model.", True),), 64, time_ids=5),
    Family("sd2", "cond_stage_model.model.", (
        TextEncoder("text_encoder", "cond_stage_model.model.", True, drops_last_layer=True),), 64),
    Family("sd1", "cond_stage_model.transformer.", (
        TextEncoder("text_encoder", "cond_stage_model.transformer.", False),), None),
)


def is_single_file(path: Path) -> bool:
    """Whether a --model path names a single-file checkpoint."""
    return Path(path).suffix.lower() in SUFFIXES


def to_diffusers_folder(path: Path, cache: Path, prediction_type: str | None = None,
                        original_config: Path | None = None) -> Path:
    """Convert a single-file checkpoint into a cached diffusers folder and return that folder."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    if not is_single_file(path):
        raise UserError(f"{path}: not a .safetensors or .ckpt checkpoint")
    yaml_path = Path(original_config) if original_config else path.with_suffix(".yaml")
    hints = read_hints(yaml_path) if original_config or yaml_path.is_file() else {}
    if prediction_type:
        hints["prediction_type"] = _prediction_type(prediction_type, path)
    dest = Path(cache) / f"{path.stem}-{cache_key(path, hints)}"
    return cached_folder(dest, lambda tmp: write_folder(load_checkpoint(path), path, tmp, hints))


def cache_key(path: Path, hints: dict) -> str:
    """Hash of the file's size, mtime and first MiB, the hints and the converter version."""
    st = path.stat()
    h = hashlib.sha256(f"{CONVERTER_VERSION}:{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(HASHED_BYTES))
    h.update(json.dumps(hints, sort_keys=True).encode())
    return h.hexdigest()[:16]


def read_hints(yaml_path: Path) -> dict:
    """What an original LDM inference .yaml says that the weights cannot: parameterization, heads, scale."""
    import yaml

    try:
        params = (yaml.safe_load(Path(yaml_path).read_text()) or {})["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"{yaml_path}: not a readable Stable Diffusion config ({type(e).__name__})") from None
    unet = (params.get("unet_config") or params.get("network_config") or {}).get("params", {})
    hints = {"prediction_type": _prediction_type(params.get("parameterization", "eps"), yaml_path),
             "scale_factor": params.get("scale_factor"), "num_heads": unet.get("num_heads"),
             "num_head_channels": unet.get("num_head_channels"), "sample_size": unet.get("image_size")}
    return {k: v for k, v in hints.items() if v not in (None, -1)}


def _prediction_type(value: str, where: Path) -> str:
    """Normalise eps / v / epsilon / v_prediction."""
    if value not in PREDICTION_TYPES:
        raise UserError(f"{where}: unknown prediction type {value!r} (use epsilon or v_prediction)")
    return PREDICTION_TYPES[value]


def load_checkpoint(path: Path) -> dict:
    """The checkpoint's tensors, unwrapped from any nested `state_dict`; one-line error if unreadable."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a checkpoint at all: one message
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                        f"({type(e).__name__}: {reason})") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path}: not a state dict checkpoint (holds a {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def detect_family(checkpoint: dict, path: Path) -> Family:
    """Pick the family from which text encoder keys the checkpoint holds."""
    for family in FAMILIES:
        if any(k.startswith(family.marker) for k in checkpoint):
            break
    else:
        raise UserError(f"{path}: unknown checkpoint layout: no cond_stage_model.* or conditioner.embedders.* "
                        "text encoder keys (expected an original Stable Diffusion 1.x / 2.x / XL checkpoint)")
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        if not any(k.startswith(prefix) for k in checkpoint):
            raise UserError(f"{path}: missing keys: no {what} weights ({prefix}*) in this {family.name} checkpoint")
    return family


def family_config(family: Family, rel: str) -> dict:
    """A config file shipped for the family."""
    return json.loads((DATA / family.name / rel).read_text())


def write_folder(checkpoint: dict, path: Path, dest: Path, hints: dict) -> None:
    """Write every component of the checkpoint as a diffusers folder into dest."""
    family = detect_family(checkpoint, path)
    try:
        unet_cfg = _write_unet(checkpoint, family, hints, dest)
        _write_vae(checkpoint, family, hints, dest)
        for text in family.texts:
            write_text_encoder(checkpoint, family_config(family, f"{text.folder}/config.json"), text, dest)
    except KeyError as e:
        raise UserError(f"{path}: missing keys: {e.args[0]} (incomplete {family.name} checkpoint)") from None
    except Mismatch as e:
        raise UserError(f"{path}: {e}") from None
    scheduler = family_config(family, "scheduler/scheduler_config.json")
    scheduler["prediction_type"] = hints.get("prediction_type", scheduler["prediction_type"])
    write_json(dest / "scheduler" / "scheduler_config.json", scheduler)
    index = family_config(family, "model_index.json")
    if unet_cfg["in_channels"] == 9:
        index["_class_name"] = index["_class_name"].replace("Pipeline", "InpaintPipeline").replace(
            "Img2ImgInpaint", "Inpaint")
    write_json(dest / "model_index.json", index)


# ---------------------------------------------------------------- UNet


def _write_unet(checkpoint: dict, family: Family, hints: dict, dest: Path) -> dict:
    """Derive the UNet config from the weights, convert with diffusers and save."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = strip(checkpoint, UNET_PREFIX)
    cfg = unet_config(sd, family, hints, _pooled_dim(checkpoint, family))
    weights = convert_ldm_unet_checkpoint(checkpoint, cfg)
    save_component(dest / "unet", cfg, weights, "diffusion_pytorch_model.safetensors",
          lambda: UNet2DConditionModel.from_config(cfg), "unet")
    return cfg


def _pooled_dim(checkpoint: dict, family: Family) -> int | None:
    """Width of the projected pooled text embedding SDXL's added conditioning takes, if any."""
    keys = [f"{t.prefix}text_projection" for t in family.texts if t.open_clip and not t.drops_last_layer]
    return next((checkpoint[k].shape[1] for k in keys if k in checkpoint), None)


def unet_config(sd: dict, family: Family, hints: dict, pooled_dim: int | None = None) -> dict:
    """The family's UNet config with every size the (un-prefixed) weights reveal filled in."""
    cfg = family_config(family, "unet/config.json")
    levels = _input_levels(sd)
    per_block = len(levels[0])
    channels = [sd[f"input_blocks.{blocks[0]}.0.out_layers.3.weight"].shape[0] for blocks in levels]
    depths = [count(sd, f"input_blocks.{blocks[0]}.1.transformer_blocks.") for blocks in levels]
    up_attn = [f"output_blocks.{u * (per_block + 1)}.1.proj_in.weight" in sd for u in range(len(levels))]
    proj_in = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    cfg.update(
        in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
        block_out_channels=channels, layers_per_block=per_block,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        cross_attention_dim=next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight")).shape[1],
        use_linear_projection=proj_in.ndim == 2, attention_head_dim=_head_dims(cfg, family, hints, channels),
        norm_num_groups=_groups(cfg["norm_num_groups"], channels))
    if "transformer_layers_per_block" in cfg or any(d > 1 for d in depths):
        used = [d or 1 for d in depths]
        cfg["transformer_layers_per_block"] = used[0] if len(set(used)) == 1 else used
    if "sample_size" in hints:
        cfg["sample_size"] = hints["sample_size"]
    if "label_emb.0.0.weight" in sd:
        added = cfg["projection_class_embeddings_input_dim"] = sd["label_emb.0.0.weight"].shape[1]
        if family.time_ids and pooled_dim:
            cfg["addition_time_embed_dim"] = (added - pooled_dim) // family.time_ids
    return cfg


def _input_levels(sd: dict) -> list[list[int]]:
    """The UNet's input block indices grouped by resolution level (a downsampler starts the next level)."""
    count = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    levels = [[]]
    for i in range(1, count):
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(i)
    return levels


def _head_dims(cfg: dict, family: Family, hints: dict, channels: list):
    """attention_head_dim: from the yaml's num_heads / num_head_channels, else the family's rule."""
    if "num_heads" in hints:
        return hints["num_heads"]
    head_channels = hints.get("num_head_channels", family.head_channels)
    if head_channels is None:
        return cfg["attention_head_dim"]
    return [max(1, c // head_channels) for c in channels]


def _groups(default: int, channels) -> int:
    """GroupNorm groups: the config's value when every width divides by it, else the largest that does."""
    return default if all(c % default == 0 for c in channels) else math.gcd(default, *channels)


# ---------------------------------------------------------------- VAE


def _write_vae(checkpoint: dict, family: Family, hints: dict, dest: Path) -> None:
    """Derive the VAE config from the weights, convert with diffusers and save."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = vae_config(strip(checkpoint, VAE_PREFIX), family, hints)
    weights = convert_ldm_vae_checkpoint(only(checkpoint, VAE_PREFIX), cfg)
    save_component(dest / "vae", cfg, weights, "diffusion_pytorch_model.safetensors",
          lambda: AutoencoderKL.from_config(cfg), "vae")


def vae_config(sd: dict, family: Family, hints: dict) -> dict:
    """The family's VAE config with the sizes the (un-prefixed) weights reveal."""
    cfg = family_config(family, "vae/config.json")
    levels = count(sd, "encoder.down.")
    channels = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    cfg.update(
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["decoder.conv_in.weight"].shape[1], block_out_channels=channels,
        layers_per_block=count(sd, "encoder.down.0.block."), down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, norm_num_groups=_groups(cfg["norm_num_groups"], channels))
    if "scale_factor" in hints:
        cfg["scaling_factor"] = hints["scale_factor"]
    return cfg
