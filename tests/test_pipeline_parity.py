"""End-to-end parity: our runtime vs diffusers on the tiny model, same initial noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.pipeline import StableDiffusionPipeline
from runtime.randn import TorchGenerator

SIZE = 64
PROMPT = ["a lighthouse at dusk, oil painting"]
NEG = ["blurry"]
DETERMINISTIC = {  # our name -> (diffusers class name, config overrides)
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
STOCHASTIC = {
    "euler-a": ("EulerAncestralDiscreteScheduler", {}), "ddpm": ("DDPMScheduler", {}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}


def diffusers_pipe(folder, cls_name="StableDiffusionPipeline", scheduler=None):
    """A diffusers pipeline on the same weights, with the requested scheduler."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        cls, overrides = scheduler
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_export):
    return StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")


@pytest.fixture(scope="module")
def latents():
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(7))


def run_both(ours, ref, steps=8, **kw):
    """(ours, reference) float images (N, H, W, 3)."""
    ours_kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    seed = ours_kw.pop("seed", None)
    if seed is not None:
        ours_kw["generator"] = TorchGenerator(seed)
        kw = {k: v for k, v in kw.items() if k != "seed"} | {"generator": torch.Generator().manual_seed(seed)}
    scheduler = ours_kw.pop("scheduler_name", None)
    kw.pop("scheduler_name", None)
    a = ours(PROMPT, negative_prompt=NEG, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
             scheduler=scheduler, **ours_kw).images
    with torch.no_grad():
        b = ref(PROMPT, negative_prompt=NEG, num_inference_steps=steps, guidance_scale=7.5, output_type="np", **kw).images
    return a, b


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_txt2img_matches_diffusers(ours, tiny_folder, latents, name):
    ref = diffusers_pipe(tiny_folder, scheduler=DETERMINISTIC[name])
    a, b = run_both(ours, ref, latents=latents, height=SIZE, width=SIZE, scheduler_name=name)
    assert a.shape == b.shape == (1, SIZE, SIZE, 3)
    assert np.abs(a - b).max() < 1e-3, name


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_schedulers_match_with_same_seed(ours, tiny_folder, name):
    ref = diffusers_pipe(tiny_folder, scheduler=STOCHASTIC[name])
    a, b = run_both(ours, ref, seed=1234, height=SIZE, width=SIZE, scheduler_name=name)
    assert np.abs(a - b).max() < 1e-3, name


def test_seed_reproduces_diffusers_noise(ours, tiny_folder):
    ref = diffusers_pipe(tiny_folder)
    a, b = run_both(ours, ref, seed=42, height=SIZE, width=SIZE + 16, num_images_per_prompt=2)
    assert a.shape == (2, SIZE, SIZE + 16, 3)
    assert np.abs(a - b).max() < 1e-3


def test_guidance_one_skips_unconditional_pass(ours, tiny_folder, latents):
    ref = diffusers_pipe(tiny_folder)
    a = ours(PROMPT, num_inference_steps=4, guidance_scale=1.0, latents=latents.numpy(), height=SIZE, width=SIZE,
             output_type="np").images
    with torch.no_grad():
        b = ref(PROMPT, num_inference_steps=4, guidance_scale=1.0, latents=latents, height=SIZE, width=SIZE,
                output_type="np").images
    assert np.abs(a - b).max() < 1e-3


def _init_image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def _mask():
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m)


@pytest.mark.parametrize("name", ["pndm", "euler", "euler-a"])
def test_img2img_matches_diffusers(ours, tiny_folder, name):
    table = DETERMINISTIC | STOCHASTIC
    ref = diffusers_pipe(tiny_folder, "StableDiffusionImg2ImgPipeline", scheduler=table[name])
    a, b = run_both(ours, ref, steps=10, seed=5, image=_init_image(), strength=0.6, scheduler_name=name)
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_blending_matches_diffusers(ours, tiny_folder, strength):
    ref = diffusers_pipe(tiny_folder, "StableDiffusionInpaintPipeline")
    a, b = run_both(ours, ref, steps=6, seed=9, image=_init_image(), mask_image=_mask(), strength=strength,
                    height=SIZE, width=SIZE)
    assert np.abs(a - b).max() < 1e-3


@pytest.fixture(scope="module")
def inpaint_folder(tiny_folder, tmp_path_factory):
    """The tiny model with a dedicated 9-channel inpainting UNet (image latents + mask + masked latents)."""
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    from sdexport.tiny import UNET_CONFIG

    folder = tmp_path_factory.mktemp("inpaint") / "tiny-inpaint"
    shutil.copytree(tiny_folder, folder)
    shutil.rmtree(folder / "unet")
    torch.manual_seed(3)
    UNet2DConditionModel(**UNET_CONFIG | {"in_channels": 9}).save_pretrained(folder / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionInpaintPipeline"}))
    return folder


@pytest.fixture(scope="module")
def inpaint_ours(inpaint_folder, tmp_path_factory):
    """Our runtime on the cpu export of the 9-channel model."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    out = tmp_path_factory.mktemp("inpaint-export") / "cpu"
    convert(ConvertConfig(str(inpaint_folder), load_profile("cpu"), out))
    return StableDiffusionPipeline.from_pretrained(out, provider="cpu")


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_nine_channel_inpaint_matches_diffusers(inpaint_folder, inpaint_ours, strength):
    ours = inpaint_ours
    assert ours.model.facts.unet_in_channels == 9
    ref = diffusers_pipe(inpaint_folder, "StableDiffusionInpaintPipeline")
    a, b = run_both(ours, ref, steps=6, seed=21, image=_init_image(), mask_image=_mask(), strength=strength,
                    height=SIZE, width=SIZE)
    assert np.abs(a - b).max() < 1e-3
