"""The built-in `tiny` model: a deterministic random-weight SD 1.x-style pipeline, written as a real folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.atomic import staged_dir

TINY_VERSION = 2          # bump when the configs below change: the cache key

SCHEDULER_CONFIG = {      # stable-diffusion-v1-5's scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None,
}

UNET_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215)

TEXT_CONFIG = dict(  # bos/eos/pad ids as in the real SD 1.x text encoder config
    vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
    max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
    pad_token_id=1)


def cache_dir() -> Path:
    """Where built-in models are materialised (XDG cache)."""
    base = os.environ.get("SDEXPORT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdexport")
    return Path(base)


def tiny_folder() -> Path:
    """The tiny model as a diffusers folder, built on first use."""
    dest = cache_dir() / f"tiny-v{TINY_VERSION}"
    if not (dest / "model_index.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with staged_dir(dest, replace_existing=True) as tmp:
            build_tiny(tmp)
    return dest


def build_tiny(dest: Path) -> None:
    """Build the tiny pipeline from config with seeded random weights and save it in the real layout."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_vocab import write_clip_tokenizer
    from .sources import quiet_libraries

    quiet_libraries()

    torch.manual_seed(0)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(dest / "unet")
    torch.manual_seed(1)
    AutoencoderKL(**VAE_CONFIG).save_pretrained(dest / "vae")
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    text.save_pretrained(dest / "text_encoder")
    _prefix_text_model_keys(dest / "text_encoder" / "model.safetensors")
    write_clip_tokenizer(dest / "tokenizer")
    (dest / "scheduler").mkdir()
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (dest / "model_index.json").write_text(json.dumps(_model_index(), indent=2))


def _prefix_text_model_keys(path: Path) -> None:
    """Rewrite CLIPTextModel weights in the `text_model.`-prefixed layout real SD repos use."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    fixed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}
    save_file(fixed, path, metadata={"format": "pt"})


def _model_index() -> dict:
    """model_index.json of a StableDiffusionPipeline."""
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
