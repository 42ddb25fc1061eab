"""Built-in tiny models: deterministic random-weight pipelines of each family, written as real diffusers folders.

`tiny` is SD 1.x-style; `tiny-sd2` (v-prediction, OpenCLIP-style text encoder), `tiny-sdxl` (two text
encoders, pooled embeddings, add_time_ids) and `tiny-lcm` (guidance-embedding UNet) follow their families'
real configs at toy sizes. Each is built offline on first use and cached.
"""
from __future__ import annotations

import json
from pathlib import Path

from .cache import cache_dir, cached_folder, quiet_libraries
from .tiny_sd3 import TINY_SD3_VERSION

TINY_VERSION = 3          # bump when the configs below change: the cache key

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

SDXL_UNET = {  # 6 time ids * addition_time_embed_dim 8 + pooled projection 32 = 80
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4), "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "transformer_layers_per_block": (1, 2), "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 64}
SDXL_VAE = {"scaling_factor": 0.13025, "force_upcast": True}
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear", "use_karras_sigmas": False}

# Each family: overrides of the SD 1.x configs above, as that family's real configs differ from SD 1.5.
VARIANTS = {
    "tiny": {"pipeline": "StableDiffusionPipeline"},
    "tiny-sd2": {   # stable-diffusion-2-1: v-prediction, linear projections, OpenCLIP text encoder (gelu, pad "!")
        "pipeline": "StableDiffusionPipeline", "pad_token": "!",
        "unet": {"use_linear_projection": True, "attention_head_dim": (2, 4)},
        "text": {"hidden_act": "gelu"},
        "scheduler": {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
    },
    "tiny-sdxl": {  # stable-diffusion-xl-base-1.0: two text encoders, text_time added conditioning
        "pipeline": "StableDiffusionXLPipeline", "text_encoder_2": True, "force_zeros_for_empty_prompt": True,
        "unet": SDXL_UNET, "vae": SDXL_VAE, "scheduler": SDXL_SCHEDULER,
    },
    "tiny-sdxl-refiner": {   # stable-diffusion-xl-refiner-1.0: text_encoder_2 only, aesthetic-score time ids
        "pipeline": "StableDiffusionXLImg2ImgPipeline", "text_encoder": False, "text_encoder_2": True,
        "force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True,
        # 5 time ids (sizes, crop, aesthetic score) * 8 + pooled 32; cross-attention from text_encoder_2 alone
        "unet": SDXL_UNET | {"projection_class_embeddings_input_dim": 72, "cross_attention_dim": 32},
        "vae": SDXL_VAE, "scheduler": SDXL_SCHEDULER,
    },
    "tiny-lcm": {   # an LCM-distilled SD 1.x UNet: guidance embedding input, LCM scheduler
        "pipeline": "LatentConsistencyModelPipeline", "unet": {"time_cond_proj_dim": 32},
        "scheduler": {"_class_name": "LCMScheduler", "original_inference_steps": 50, "timestep_scaling": 10.0,
                      "clip_sample": False, "set_alpha_to_one": True},
    },
    # stable-diffusion-3.5-medium at toy sizes: MMDiT transformer, CLIP-L + CLIP-G + T5, 16-channel VAE
    "tiny-sd3": {"pipeline": "StableDiffusion3Pipeline", "builder": "sdexport.tiny_sd3:build_tiny_sd3",
                 "version": TINY_SD3_VERSION},
}


def tiny_folder(name: str = "tiny") -> Path:
    """A built-in tiny model as a diffusers folder, built on first use."""
    version = VARIANTS[name].get("version", TINY_VERSION) if name in VARIANTS else TINY_VERSION
    return cached_folder(cache_dir() / f"{name}-v{version}", lambda tmp: build_tiny(tmp, name))


def build_tiny(dest: Path, name: str = "tiny") -> None:
    """Build one tiny pipeline from config with seeded random weights and save it in the real layout."""
    v = VARIANTS[name]
    if "builder" in v:                  # a family with its own configs (module:function)
        import importlib
        module, func = v["builder"].split(":")
        return getattr(importlib.import_module(module), func)(dest)
    build_pipeline(dest, unet=UNET_CONFIG | v.get("unet", {}), vae=VAE_CONFIG | v.get("vae", {}),
                   text=TEXT_CONFIG | v.get("text", {}), scheduler=SCHEDULER_CONFIG | v.get("scheduler", {}), facts=v)


def build_pipeline(dest: Path, *, unet: dict, vae: dict, text: dict, scheduler: dict, facts: dict) -> None:
    """Save a seeded random-weight pipeline (UNet, VAE, text encoders, tokenizers, scheduler) in the real layout."""
    # facts: a VARIANTS entry's pipeline facts (pipeline class, which text encoders, pad token, model_index flags)
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .clip_vocab import write_clip_tokenizer

    quiet_libraries()
    random_unet(unet).save_pretrained(dest / "unet")
    torch.manual_seed(1)
    AutoencoderKL(**vae).save_pretrained(dest / "vae")
    text_config = CLIPTextConfig(**text)
    encoders = [("text_encoder", CLIPTextModel, "<|endoftext|>", 2)] if facts.get("text_encoder", True) else []
    if facts.get("text_encoder_2"):
        encoders.append(("text_encoder_2", CLIPTextModelWithProjection, "!", 3))
    for folder, cls, pad, seed in encoders:
        torch.manual_seed(seed)
        cls(text_config).save_pretrained(dest / folder)
        prefix_text_model_keys(dest / folder / "model.safetensors")
        write_clip_tokenizer(dest / folder.replace("text_encoder", "tokenizer"), pad_token=facts.get("pad_token", pad))
    (dest / "scheduler").mkdir()
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (dest / "model_index.json").write_text(json.dumps(_model_index(facts, scheduler["_class_name"]), indent=2))


def random_unet(config: dict):
    """The UNet of `config` with seeded random weights (seed 0, as in every built pipeline)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def prefix_text_model_keys(path: Path) -> None:
    """Rewrite CLIP text-model weights in the `text_model.`-prefixed layout real SD repos use."""
    from safetensors.torch import load_file, save_file

    from .checkpoint_io import with_text_model_prefix

    save_file(with_text_model_prefix(load_file(path)), path, metadata={"format": "pt"})


def _model_index(v: dict, scheduler: str) -> dict:
    """model_index.json of the variant's diffusers pipeline class."""
    import diffusers

    first = v.get("text_encoder", True)
    index = {
        "_class_name": v["pipeline"], "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"] if first else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"] if first else [None, None],
    }
    if v.get("text_encoder_2"):
        index |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"],
                  "force_zeros_for_empty_prompt": v.get("force_zeros_for_empty_prompt", True)}
        if "requires_aesthetics_score" in v:
            index["requires_aesthetics_score"] = v["requires_aesthetics_score"]
    else:
        index |= {"feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False}
    return index
