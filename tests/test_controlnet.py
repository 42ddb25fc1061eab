"""ControlNet: export (one graph per ControlNet, a residual UNet), runtime parity with diffusers' ControlNet
pipelines on the same latents, and the errors users meet. Tiny ControlNets are built from the tiny UNets'
configs (ControlNetModel.from_unet) with their zero-initialised convs re-drawn so they change the image."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.control import ControlUnit, a1111_units, control_units, keep, preprocess_control
from runtime.errors import UserError
from runtime.randn import TorchGenerator

SIZE = 64
PROMPT, NEG = "a lighthouse at dusk, oil painting", "blurry"


def build_controlnet(base_unet_folder, dest, seed: int):
    """A tiny ControlNet from a UNet's config and weights; its zero convs get random weights so they matter."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_unet_folder)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_pretrained(dest)
    return dest


def control_image(seed: int, size=(SIZE, SIZE)) -> Image.Image:
    """A random RGB condition image (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def nets(tiny_folder, tmp_path_factory):
    """Two tiny SD 1.x ControlNets (folders)."""
    root = tmp_path_factory.mktemp("controlnets")
    return [build_controlnet(tiny_folder / "unet", root / f"cn{i}", seed=10 + i) for i in range(2)]


@pytest.fixture(scope="session")
def sd_export(nets, tmp_path_factory):
    """(folder, report) of `sdexport convert --model tiny --controlnet A --controlnet B --target cpu`."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    out = tmp_path_factory.mktemp("exports") / "tiny-controlnet"
    return out, convert(ConvertConfig("tiny", load_profile("cpu"), out, controlnets=tuple(map(str, nets))))


@pytest.fixture(scope="session")
def sdxl_export(_isolated_cache, tmp_path_factory):
    """(folder, ControlNet folder) of tiny-sdxl exported with one ControlNet."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile
    from sdexport.tiny import tiny_folder

    root = tmp_path_factory.mktemp("sdxl-controlnet")
    net = build_controlnet(tiny_folder("tiny-sdxl") / "unet", root / "cn", seed=20)
    convert(ConvertConfig("tiny-sdxl", load_profile("cpu"), root / "out", controlnets=(str(net),)))
    return root / "out", net


def reference(folder, nets, cls="StableDiffusionControlNetPipeline"):
    """The diffusers ControlNet pipeline on the same weights (a list of nets: MultiControlNet)."""
    import diffusers

    models = [diffusers.ControlNetModel.from_pretrained(n) for n in nets]
    extra = {} if "XL" in cls else {"safety_checker": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, cls).from_pretrained(folder, controlnet=models if len(models) > 1 else models[0],
                                                   **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours_folder, ref, images, steps=6, seed=None, **kw):
    """Max abs difference of our images and diffusers' for the same request; kw in diffusers' names."""
    from runtime.pipeline import StableDiffusionPipeline

    ours = StableDiffusionPipeline.from_pretrained(ours_folder, provider="cpu")
    common = dict(negative_prompt=NEG, num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    ref_kw = dict(kw)
    if seed is None:
        latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(7))
        kw["latents"], ref_kw["latents"] = latents.numpy(), latents
        kw["height"] = kw["width"] = ref_kw["height"] = ref_kw["width"] = SIZE
    else:
        kw["generator"], ref_kw["generator"] = TorchGenerator(seed), torch.Generator().manual_seed(seed)
    control_key = "control_image" if "image" in kw else "image"     # diffusers' txt2img calls it `image`
    ref_kw[control_key] = images if len(images) > 1 else images[0]
    a = ours(PROMPT, control_image=images, **common, **kw).images
    with torch.no_grad():
        b = ref(PROMPT, **common, **ref_kw).images
    assert a.shape == b.shape
    return float(np.abs(a - b).max()), ours


# -- parity with diffusers (each runs the tiny export once per session) --------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_one_controlnet_matches_diffusers(sd_export, tiny_folder, nets, scale):
    err, ours = compare(sd_export[0], reference(tiny_folder, nets[:1]), [control_image(1)],
                        controlnet_conditioning_scale=scale)
    assert err <= 1e-3
    assert "unet_controlled" in ours.model._graphs           # the residual UNet ran


@pytest.mark.slow
@pytest.mark.parametrize("guess_mode", [False, True])
def test_two_controlnets_with_windows_match_diffusers(sd_export, tiny_folder, nets, guess_mode):
    images = [control_image(1), control_image(2, (80, 48))]   # the second at another size: resized, as diffusers
    err, _ = compare(sd_export[0], reference(tiny_folder, nets), images, steps=8,
                     controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.3],
                     control_guidance_end=[0.6, 1.0], guess_mode=guess_mode)
    assert err <= 1e-3


@pytest.mark.slow
def test_controlnet_img2img_matches_diffusers(sd_export, tiny_folder, nets):
    init = control_image(5)
    err, _ = compare(sd_export[0], reference(tiny_folder, nets[:1], "StableDiffusionControlNetImg2ImgPipeline"),
                     [control_image(1)], steps=10, seed=3, image=init, strength=0.6, control_guidance_end=0.7)
    assert err <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_controlnet_matches_diffusers(sdxl_export, guess_mode):
    from sdexport.tiny import tiny_folder

    folder, net = sdxl_export
    err, _ = compare(folder, reference(tiny_folder("tiny-sdxl"), [net], "StableDiffusionXLControlNetPipeline"),
                     [control_image(4)], controlnet_conditioning_scale=0.5, control_guidance_start=0.2,
                     guess_mode=guess_mode)
    assert err <= 1e-3


@pytest.mark.slow
def test_export_verifies_each_controlnet_and_lists_them(sd_export, nets):
    folder, report = sd_export
    checked = {c.component for c in report.checks if c.ran and c.ok}
    assert {"controlnet", "controlnet_1", "unet_controlled", "unet"} <= checked
    manifest = json.loads((folder / "sdexport.json").read_text())
    assert [c["graph"] for c in manifest["source"]["controlnets"]] == ["controlnet", "controlnet_1"]
    assert manifest["source"]["controlnets"][1]["folder"] == str(nets[1].resolve())
    outputs = [t["name"] for t in manifest["graphs"]["controlnet"]["outputs"]]
    assert outputs == [f"down_block_res_sample_{i}" for i in range(4)] + ["mid_block_res_sample"]
    inputs = {t["name"]: t["shape"] for t in manifest["graphs"]["unet_controlled"]["inputs"]}
    assert inputs["down_block_res_sample_3"] == ["batch", 64, "latent_height/2", "latent_width/2"]
    assert [t["name"] for t in manifest["graphs"]["unet"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]


@pytest.mark.slow
def test_too_many_control_images_are_refused(sd_export):
    from runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_export[0], provider="cpu")
    with pytest.raises(UserError, match="3 control images for 2 ControlNet"):
        pipe(PROMPT, num_inference_steps=2, control_image=[control_image(1)] * 3, output_type="np")


# -- errors and pieces (fast) ----------------------------------------------------------------------------------

def test_controlnet_for_another_base_is_refused_at_convert(tmp_path, _isolated_cache):
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile
    from sdexport.tiny import tiny_folder

    other = build_controlnet(tiny_folder("tiny-sdxl") / "unet", tmp_path / "xl-net", seed=1)
    with pytest.raises(UserError, match="cross-attention width 64 but this model's UNet has 32"):
        convert(ConvertConfig("tiny", load_profile("cpu"), tmp_path / "out", controlnets=(str(other),)))
    assert not (tmp_path / "out").exists()


def test_controlnet_sources_that_are_not_controlnets_are_refused(tiny_folder, tmp_path):
    from sdexport.controlnet import resolve_controlnet

    with pytest.raises(UserError, match="describes a UNet2DConditionModel, not a diffusers ControlNetModel"):
        resolve_controlnet(str(tiny_folder / "unet"))
    ckpt = tmp_path / "control_sd15_canny.pth"
    ckpt.write_bytes(b"\0")
    with pytest.raises(UserError, match="single-file ControlNet checkpoints are not supported"):
        resolve_controlnet(str(ckpt))
    with pytest.raises(UserError, match="neither an existing folder nor a Hugging Face repo id"):
        resolve_controlnet(str(tmp_path / "missing" / "deeper"))


def test_control_image_on_folder_without_controlnet(tiny_export, tmp_path):
    from click.testing import CliRunner

    from runtime.cli import main

    edges = tmp_path / "edges.png"
    control_image(1).save(edges)
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_export[0]), "--prompt", "x", "--steps", "1",
                                       "--control-image", str(edges), "--out", str(tmp_path / "o.png"), "--quiet"])
    assert result.exit_code != 0
    assert "exported without ControlNet" in result.output
    assert "Traceback" not in result.output


def test_control_preprocessing_matches_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    image = control_image(3, (80, 48))                               # another size: resized to the generation's
    ref = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False).preprocess(
        image, height=SIZE, width=SIZE).numpy()
    ours = preprocess_control(image, SIZE, SIZE)
    assert ours.shape == (1, 3, SIZE, SIZE) and 0.0 <= ours.min() and ours.max() <= 1.0
    assert np.abs(ours - ref).max() < 1e-6


def test_keep_schedule_is_diffusers_controlnet_keep():
    steps = 10
    assert [keep(i, steps, 0.2, 0.7) for i in range(steps)] == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert [keep(i, steps, 0.0, 1.0) for i in range(steps)] == [1] * steps


def test_control_units_broadcast_and_validate():
    a, b = control_image(1), control_image(2)
    units = control_units([a, b], 0.5, [0.0, 0.2], None)
    assert [(u.scale, u.start, u.end) for u in units] == [(0.5, 0.0, 1.0), (0.5, 0.2, 1.0)]
    with pytest.raises(UserError, match="has 3 values for 2 control images"):
        control_units([a, b], [1.0, 1.0, 1.0])
    with pytest.raises(UserError, match="need a control_image"):
        control_units(None, 0.5)
    from runtime.request import GenerationRequest

    with pytest.raises(UserError, match="start 0.8 and end 0.5"):
        GenerationRequest(PROMPT, controls=(ControlUnit(a, 1.0, 0.8, 0.5),))
    with pytest.raises(UserError, match="scale must be a finite number"):
        GenerationRequest(PROMPT, controls=(ControlUnit(a, float("nan")),))
    assert GenerationRequest(PROMPT, controls=[ControlUnit(a)]).controls == (ControlUnit(a),)


def test_a1111_controlnet_payload_becomes_units():
    decoded = control_image(1)
    args = [{"enabled": False, "image": "xx"},
            {"image": "b64", "weight": 0.6, "guidance_start": 0.1, "guidance_end": 0.9, "module": "none",
             "model": "control_v11p_sd15_canny [d14c016b]"}]
    units = a1111_units(args, decode=lambda text, field: decoded)
    assert units == (ControlUnit(decoded, 0.6, 0.1, 0.9, "controlnet_1"),)
    with pytest.raises(UserError, match="preprocessor 'canny' is not run here"):
        a1111_units([{"image": "b64", "module": "canny"}], decode=lambda text, field: decoded)
    with pytest.raises(UserError, match=r"args\[0\].weight must be a number"):
        a1111_units([{"image": decoded, "weight": "strong"}])


def test_cli_control_options_need_images_and_matching_counts(tmp_path):
    from click.testing import CliRunner

    from runtime.cli import main

    edges = tmp_path / "edges.png"
    control_image(1).save(edges)
    base = ["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o.png"), "--quiet"]
    result = CliRunner().invoke(main, base + ["--control-scale", "0.5"])
    assert result.exit_code != 0 and "--control-scale needs --control-image" in result.output
    result = CliRunner().invoke(main, base + ["--control-image", str(edges), "--control-start", "0.1",
                                              "--control-start", "0.2", "--control-image", str(edges),
                                              "--control-image", str(edges)])
    assert result.exit_code != 0 and "--control-start is given 2 times for 3 --control-image" in result.output
