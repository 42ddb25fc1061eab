"""Benchmark models: the built-in tiny family, SD 1.5 with random weights, and local diffusers folders."""
from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

from sdexport.cache import cache_dir, cached_folder
from sdexport.tiny import SCHEDULER_CONFIG, VARIANTS, build_pipeline, random_unet, tiny_folder

SD15_VERSION = 1          # bump when the configs below change: the cache key

SD15_UNET = dict(         # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)

SD15_VAE = dict(          # vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)

SD15_TEXT = dict(         # text_encoder/config.json (CLIP ViT-L/14 text tower)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=0, eos_token_id=2, pad_token_id=1)


SD15_SMALL_VERSION = 1    # the cache key of the half-width model below
SD15_SMALL_UNET = SD15_UNET | dict(block_out_channels=(160, 320, 640, 640))   # half width: ~1/4 of the UNet work


def sd15_unet():
    """The full-size SD 1.5 UNet with seeded random weights."""
    return random_unet(SD15_UNET).eval()


def sd15_folder() -> Path:
    """SD 1.5 with random weights as a diffusers folder, built once into the cache."""
    return cached_folder(cache_dir() / f"sd15-random-v{SD15_VERSION}", build_sd15)


def sd15_small_folder() -> Path:
    """A small SD 1.5-like model (half-width UNet, the real text encoder and VAE) with random weights."""
    return cached_folder(cache_dir() / f"sd15-small-random-v{SD15_SMALL_VERSION}", partial(build_sd15, unet=SD15_SMALL_UNET))


def build_sd15(dest: Path, unet: dict = SD15_UNET) -> None:
    """Save UNet, VAE, text encoder, tokenizer and scheduler in the real SD 1.5 layout."""
    build_pipeline(dest, unet=unet, vae=SD15_VAE, text=SD15_TEXT, scheduler=SCHEDULER_CONFIG,
                   facts=VARIANTS["tiny"])


# the bench times text-to-image, which an image-to-image-only pipeline (the SDXL refiner) does not do
IMAGE_TO_IMAGE = {name for name, v in VARIANTS.items() if v["pipeline"].endswith("Img2ImgPipeline")}
BUILDERS = {name: partial(tiny_folder, name) for name in VARIANTS if name not in IMAGE_TO_IMAGE}
BUILDERS["sd15-random"] = sd15_folder
BUILDERS["sd15-small-random"] = sd15_small_folder


def skip_reason(name: str) -> str | None:
    """Why a model cannot be benchmarked here, or None."""
    if name in IMAGE_TO_IMAGE:
        return f"{name} is an image-to-image pipeline; the bench measures text-to-image"
    if name not in BUILDERS and not (Path(name) / "model_index.json").is_file():
        return f"unknown model {name!r}: not one of {', '.join(BUILDERS)} nor a diffusers folder"
    return None


def model_folder(name: str) -> Path:
    """The diffusers folder of a benchmark model (built on first use)."""
    return BUILDERS[name]() if name in BUILDERS else Path(name).resolve()


def model_key(name: str) -> str:
    """A short stable id of a model for export cache keys."""
    folder = model_folder(name)
    return hashlib.sha256(str(folder).encode()).hexdigest()[:12]
