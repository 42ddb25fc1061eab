"""Model families on tiny random-weight models: SD 2.x (v-prediction), SDXL, LCM, Turbo settings, vs diffusers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.pipeline import StableDiffusionPipeline
from runtime.schedulers import from_config

SIZE = 64
TURBO_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}


def reference(folder, cls_name):
    """The diffusers pipeline class for the family, on the same folder."""
    import diffusers

    kw = {} if "XL" in cls_name else {"safety_checker": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def exports(family_export):
    """name -> (source folder, our pipeline on its cpu export), converted once per run (conftest.family_export)."""
    out = {}

    def get(name):
        if name not in out:
            folder, dest = family_export(name)
            out[name] = (folder, StableDiffusionPipeline.from_pretrained(dest, provider="cpu"))
        return out[name]
    return get


def latents(batch=1, seed=3):
    return torch.randn((batch, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))


def compare(ours, ref, lat=None, **kw):
    """Max abs pixel difference between our runtime and diffusers for the same request."""
    ours_kw = dict(kw)
    kw.pop("scheduler", None)
    if lat is not None:
        kw["latents"], ours_kw["latents"] = lat, lat.numpy()
    if "seed" in kw:
        ours_kw["generator"] = None
        kw["generator"] = torch.Generator().manual_seed(kw.pop("seed"))
    a = ours(**ours_kw, height=SIZE, width=SIZE, output_type="np").images
    with torch.no_grad():
        b = ref(**kw, height=SIZE, width=SIZE, output_type="np").images
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def test_sd2_v_prediction_matches(exports):
    folder, ours = exports("tiny-sd2")
    assert ours.model.facts.scheduler_config["prediction_type"] == "v_prediction"
    assert ours.model.tokenizers["tokenizer"].pad_token_id == 0          # OpenCLIP pads with "!"
    ref = reference(folder, "StableDiffusionPipeline")
    err = compare(ours, ref, latents(), prompt="a red barn", negative_prompt="fog", num_inference_steps=6,
                  guidance_scale=7.0)
    assert err < 1e-3


@pytest.mark.parametrize("negative", [None, "low quality"])
def test_sdxl_matches(exports, negative):
    folder, ours = exports("tiny-sdxl")
    ref = reference(folder, "StableDiffusionXLPipeline")
    err = compare(ours, ref, latents(2), prompt="a red barn", negative_prompt=negative, num_inference_steps=5,
                  guidance_scale=5.0, num_images_per_prompt=2)
    assert err < 1e-3


def test_sdxl_graphs_take_added_conditioning(exports):
    _, ours = exports("tiny-sdxl")
    unet = ours.model.graph("unet").inputs
    assert unet["text_embeds"].shape == ["batch", 32] and unet["time_ids"].shape == ["batch", 6]
    assert ours.model.has("text_encoder_2") and set(ours.model.tokenizers) == {"tokenizer", "tokenizer_2"}


def test_lcm_matches(exports):
    folder, ours = exports("tiny-lcm")
    assert "timestep_cond" in ours.model.graph("unet").inputs
    ref = reference(folder, "LatentConsistencyModelPipeline")
    err = compare(ours, ref, latents(), prompt="a red barn", num_inference_steps=4, guidance_scale=8.5,
                  seed=11)
    assert err < 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_settings_match(exports, steps):
    """SD-Turbo style: Euler ancestral, trailing spacing, guidance 0, 1-4 steps."""
    import diffusers

    folder, ours = exports("tiny-sd2")
    cfg = ours.model.facts.scheduler_config | TURBO_SCHEDULER
    ref = reference(folder, "StableDiffusionPipeline")
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(cfg)
    err = compare(ours, ref, prompt="a red barn", num_inference_steps=steps, guidance_scale=0.0, seed=5,
                  scheduler=from_config(cfg))
    assert err < 1e-3


def _init_image():
    from PIL import Image

    rng = np.random.default_rng(4)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_sdxl_img2img_and_refiner_match(exports, name):
    """SDXL img2img; the refiner has only text_encoder_2 and aesthetic-score time ids."""
    folder, ours = exports(name)
    ref = reference(folder, "StableDiffusionXLImg2ImgPipeline")
    err = compare(ours, ref, prompt="a red barn", negative_prompt="fog", image=_init_image(), strength=0.6,
                  num_inference_steps=6, guidance_scale=5.0, seed=8)
    assert err < 1e-3
