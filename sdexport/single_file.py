"""Single-file checkpoints (.safetensors / .ckpt, original CompVis or SGM key layout) as diffusers folders."""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from runtime.errors import UserError

from .cache import cached_folder

CONVERTER_VERSION = 1     # bump when the conversion below changes: part of the cache key
DATA = Path(__file__).parent / "data" / "single_file"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SUFFIXES = (".safetensors", ".ckpt")
PREDICTION_TYPES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                    "sample": "sample"}
HASHED_BYTES = 1 << 20


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: its diffusers folder, checkpoint prefix and key style."""
    folder: str
    tokenizer: str
    prefix: str
    open_clip: bool              # OpenCLIP resblocks layout (else transformers CLIP keys under the prefix)
    drops_last_layer: bool = False   # SD 2.x runs OpenCLIP's penultimate layer: diffusers keeps one layer less


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
        TextEncoder("text_encoder", "tokenizer", "conditioner.embedders.0.transformer.", False),
        TextEncoder("text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", True)), 64, time_ids=6),
    Family("sdxl_refiner", "conditioner.embedders.0.model.", (
        TextEncoder("text_encoder_2", "tokenizer_2", "conditioner.embedders.0.model.", True),), 64, time_ids=5),
    Family("sd2", "cond_stage_model.model.", (
        TextEncoder("text_encoder", "tokenizer", "cond_stage_model.model.", True, drops_last_layer=True),), 64),
    Family("sd1", "cond_stage_model.transformer.", (
        TextEncoder("text_encoder", "tokenizer", "cond_stage_model.transformer.", False),), None),
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
            _write_text_encoder(checkpoint, family, text, dest)
    except KeyError as e:
        raise UserError(f"{path}: missing keys: {e.args[0]} (incomplete {family.name} checkpoint)") from None
    except _Mismatch as e:
        raise UserError(f"{path}: {e}") from None
    scheduler = family_config(family, "scheduler/scheduler_config.json")
    scheduler["prediction_type"] = hints.get("prediction_type", scheduler["prediction_type"])
    _write_json(dest / "scheduler" / "scheduler_config.json", scheduler)
    index = family_config(family, "model_index.json")
    if unet_cfg["in_channels"] == 9:
        index["_class_name"] = index["_class_name"].replace("Pipeline", "InpaintPipeline").replace(
            "Img2ImgInpaint", "Inpaint")
    _write_json(dest / "model_index.json", index)


class _Mismatch(Exception):
    """Converted weights that do not fit the derived config."""


# ---------------------------------------------------------------- UNet


def _write_unet(checkpoint: dict, family: Family, hints: dict, dest: Path) -> dict:
    """Derive the UNet config from the weights, convert with diffusers and save."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = _strip(checkpoint, UNET_PREFIX)
    cfg = unet_config(sd, family, hints, _pooled_dim(checkpoint, family))
    weights = convert_ldm_unet_checkpoint(checkpoint, cfg)
    _save(dest / "unet", cfg, weights, "diffusion_pytorch_model.safetensors",
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
    depths = [_count(sd, f"input_blocks.{blocks[0]}.1.transformer_blocks.") for blocks in levels]
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

    cfg = vae_config(_strip(checkpoint, VAE_PREFIX), family, hints)
    weights = convert_ldm_vae_checkpoint(_only(checkpoint, VAE_PREFIX), cfg)
    _save(dest / "vae", cfg, weights, "diffusion_pytorch_model.safetensors",
          lambda: AutoencoderKL.from_config(cfg), "vae")


def vae_config(sd: dict, family: Family, hints: dict) -> dict:
    """The family's VAE config with the sizes the (un-prefixed) weights reveal."""
    cfg = family_config(family, "vae/config.json")
    levels = _count(sd, "encoder.down.")
    channels = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    cfg.update(
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["decoder.conv_in.weight"].shape[1], block_out_channels=channels,
        layers_per_block=_count(sd, "encoder.down.0.block."), down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, norm_num_groups=_groups(cfg["norm_num_groups"], channels))
    if "scale_factor" in hints:
        cfg["scaling_factor"] = hints["scale_factor"]
    return cfg


# ---------------------------------------------------------------- text encoders


def _write_text_encoder(checkpoint: dict, family: Family, text: TextEncoder, dest: Path) -> None:
    """Convert one text encoder (CLIP or OpenCLIP keys) with diffusers, save it and its tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .clip_vocab import write_clip_tokenizer

    cfg = family_config(family, f"{text.folder}/config.json")
    if text.open_clip:
        sub = _open_clip_subset(checkpoint, text)
        cfg.update(open_clip_sizes(_strip(sub, text.prefix), cfg, keep_projection=not text.drops_last_layer))
        weights = _convert_open_clip(sub, text.prefix, cfg["hidden_size"])
    else:
        weights = _convert_clip(checkpoint, text.prefix)
        cfg.update(clip_sizes(weights, cfg))
    cls = CLIPTextModelWithProjection if cfg["architectures"] == ["CLIPTextModelWithProjection"] else CLIPTextModel
    _save(dest / text.folder, cfg, weights, "model.safetensors",
          lambda: cls(CLIPTextConfig.from_dict(cfg)), text.folder)
    write_clip_tokenizer(dest / text.tokenizer, **({"pad_token": "!"} if text.open_clip else {}),
                         model_max_length=cfg["max_position_embeddings"])


def _open_clip_subset(checkpoint: dict, text: TextEncoder) -> dict:
    """The OpenCLIP tensors under the prefix, minus the last layer and projection SD 2.x never runs."""
    sub = _only(checkpoint, text.prefix)
    if not text.drops_last_layer:
        return sub
    last = _count(_strip(sub, text.prefix), "transformer.resblocks.") - 1
    unused = (f"{text.prefix}transformer.resblocks.{last}.", f"{text.prefix}text_projection")
    return {k: v for k, v in sub.items() if not k.startswith(unused)}


def _convert_open_clip(sub: dict, prefix: str, hidden: int) -> dict:
    """diffusers' OpenCLIP -> transformers CLIP conversion (q/k/v split by the hidden size)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sizes = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))  # all it reads of the model
    return convert_open_clip_checkpoint(sizes, sub, prefix=prefix)


def _convert_clip(checkpoint: dict, prefix: str) -> dict:
    """diffusers' CLIP key conversion, normalised to the `text_model.`-prefixed layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    weights = convert_ldm_clip_checkpoint(_only(checkpoint, prefix), remove_prefix=prefix)
    weights = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
               for k, v in weights.items()}
    weights.pop("text_model.embeddings.position_ids", None)
    return weights


def clip_sizes(weights: dict, cfg: dict) -> dict:
    """Text encoder sizes from transformers-layout CLIP weights."""
    token = weights["text_model.embeddings.token_embedding.weight"]
    sizes = dict(vocab_size=token.shape[0], hidden_size=token.shape[1],
                 max_position_embeddings=weights["text_model.embeddings.position_embedding.weight"].shape[0],
                 num_hidden_layers=_count(weights, "text_model.encoder.layers."),
                 intermediate_size=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    if "text_projection.weight" in weights:
        sizes["projection_dim"] = weights["text_projection.weight"].shape[0]
    return _heads(cfg, sizes["hidden_size"]) | sizes


def open_clip_sizes(sd: dict, cfg: dict, keep_projection: bool) -> dict:
    """Text encoder sizes from (un-prefixed) OpenCLIP weights."""
    token = sd["token_embedding.weight"]
    sizes = dict(vocab_size=token.shape[0], hidden_size=token.shape[1],
                 max_position_embeddings=sd["positional_embedding"].shape[0],
                 num_hidden_layers=_count(sd, "transformer.resblocks."),
                 intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    if keep_projection and "text_projection" in sd:
        sizes["projection_dim"] = sd["text_projection"].shape[1]
    return _heads(cfg, sizes["hidden_size"]) | sizes


def _heads(cfg: dict, hidden: int) -> dict:
    """Heads (invisible in weights) for a non-standard width: 64-wide (8-wide if small); projection as wide."""
    if hidden == cfg["hidden_size"]:
        return {}
    return {"num_attention_heads": hidden // 64 if hidden % 64 == 0 else max(1, hidden // 8),
            "projection_dim": hidden}


# ---------------------------------------------------------------- shared


def _strip(checkpoint: dict, prefix: str) -> dict:
    """The tensors under prefix, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}


def _only(checkpoint: dict, prefix: str) -> dict:
    """The tensors under prefix, keys unchanged."""
    return {k: v for k, v in checkpoint.items() if k.startswith(prefix)}


def _count(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix<N>.` the keys have."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _save(folder: Path, cfg: dict, weights: dict, filename: str, build, name: str) -> None:
    """Check the weights against a meta-device model of cfg, then write config.json and safetensors."""
    from safetensors.torch import save_file

    _check_fit(weights, _expected_shapes(build), name)
    folder.mkdir(parents=True)
    _write_json(folder / "config.json", cfg)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / filename), metadata={"format": "pt"})


def _expected_shapes(build) -> dict:
    """Parameter and buffer shapes of the model build() makes, without allocating its weights."""
    import torch

    from .cache import quiet_libraries

    quiet_libraries()
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _check_fit(weights: dict, expected: dict, name: str) -> None:
    """Raise _Mismatch naming the first missing, unexpected or mis-shaped tensors."""
    expected = {k.removeprefix("text_model."): v for k, v in expected.items()}   # CLIPTextModel is flat
    have = {k.removeprefix("text_model."): tuple(v.shape) for k, v in weights.items()}
    problems = []
    for label, keys in (("missing keys", expected.keys() - have.keys()),
                        ("unexpected keys", have.keys() - expected.keys()),
                        ("wrong shapes", {k for k in expected.keys() & have.keys() if expected[k] != have[k]})):
        if keys:
            problems.append(f"{label} {', '.join(sorted(keys)[:3])}{'...' if len(keys) > 3 else ''}")
    if problems:
        raise _Mismatch(f"{name} weights do not fit the layout derived from the checkpoint ({'; '.join(problems)})")


def _write_json(path: Path, data: dict) -> None:
    """Indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
