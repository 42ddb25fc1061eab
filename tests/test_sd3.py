"""Stable Diffusion 3.x on the tiny random-weight `tiny-sd3`: verified export, flow-matching schedulers, T5
tokenizer, and the torch-free pipeline against diffusers' StableDiffusion3Pipeline on the same latents."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.errors import UserError
from runtime.schedulers import from_config
from runtime.sd3_pipeline import StableDiffusion3Pipeline
from sdexport.convert import ConvertConfig, convert
from sdexport.profiles import load_profile
from sdexport.tiny import tiny_folder

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
GRAPHS = {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_encoder", "vae_decoder"}
PROMPTS = dict(prompt="a red barn", prompt_2="a blue barn at dusk", prompt_3="an old barn in the snow",
               negative_prompt="fog", negative_prompt_3="blurry low quality", max_sequence_length=32)


@pytest.fixture(scope="module")
def sd3_export(tmp_path_factory):
    """(source folder, export folder, convert report) of `sdexport convert --model tiny-sd3 --target cpu`."""
    out = tmp_path_factory.mktemp("sd3") / "tiny-sd3-cpu"
    report = convert(ConvertConfig("tiny-sd3", load_profile("cpu"), out))
    return tiny_folder("tiny-sd3"), out, report


@pytest.fixture(scope="module")
def ours(sd3_export):
    return StableDiffusion3Pipeline.from_pretrained(sd3_export[1], provider="cpu")


def reference(folder, cls_name="StableDiffusion3Pipeline", **components):
    """diffusers' SD3 pipeline class on the same source folder."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(batch=2, seed=3):
    return torch.randn((batch, 16, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))


def run_both(pipe, ref, lat=None, seed=None, **kw):
    """(our images, diffusers' images) as (N, H, W, 3) floats for the same request."""
    ours_kw, ref_kw = dict(kw), {k: v for k, v in kw.items() if k != "scheduler"}
    if lat is not None:
        ours_kw["latents"], ref_kw["latents"] = lat.numpy(), lat
    if seed is not None:
        ours_kw["seed"], ref_kw["generator"] = seed, torch.Generator().manual_seed(seed)
    a = pipe(**ours_kw, height=SIZE, width=SIZE, output_type="np").images
    with torch.no_grad():
        b = ref(**ref_kw, height=SIZE, width=SIZE, output_type="np").images
    assert a.shape == b.shape and b.std() > 0.01
    return a, b


def test_convert_verifies_every_graph_at_two_shapes(sd3_export):
    _, out, report = sd3_export
    assert report.ok and {c.component for c in report.checks} == GRAPHS
    for name in GRAPHS:
        for stage in ("traced", "optimised"):
            checks = [c for c in report.checks if c.component == name and c.stage == stage]
            assert len(checks) == 2 and all(c.ran and c.ok for c in checks), (name, stage)
            assert len({c.shape for c in checks}) == 2, (name, stage)         # batch, size and sequence vary
    manifest = json.loads((out / "sdexport.json").read_text())
    transformer = manifest["graphs"]["transformer"]
    assert [t["name"] for t in transformer["inputs"]] == [
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]          # Optimum's names
    assert [t["name"] for t in transformer["outputs"]] == ["out_hidden_states"]
    assert transformer["inputs"][0]["shape"] == ["batch", 16, "latent_height", "latent_width"]
    assert manifest["graphs"]["text_encoder_3"]["outputs"][0]["shape"] == ["batch", "sequence", 96]
    assert {t["name"] for t in manifest["graphs"]["text_encoder"]["outputs"]} >= {"text_embeds", "hidden_states.1"}
    assert (out / "tokenizer_3" / "tokenizer.json").is_file()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"


@pytest.mark.parametrize("scheduler", ["flow-euler", "flow-heun"])
def test_txt2img_matches_diffusers(sd3_export, ours, scheduler):
    """Three encoders with their own prompts, guidance with negatives, 2 images per prompt, given latents."""
    import diffusers

    folder = sd3_export[0]
    ref = reference(folder)
    if scheduler == "flow-heun":
        ref.scheduler = diffusers.FlowMatchHeunDiscreteScheduler.from_config(ref.scheduler.config)
    a, b = run_both(ours, ref, latents(), num_inference_steps=3, guidance_scale=5.0, num_images_per_prompt=2,
                    scheduler=scheduler, **PROMPTS)
    assert np.abs(a - b).max() <= 1e-3


def test_txt2img_without_t5_matches_diffusers(sd3_export, ours):
    """text_encoder_3=None on both sides: T5's part of the joint sequence is zeros."""
    folder, out, _ = sd3_export
    no_t5 = StableDiffusion3Pipeline.from_pretrained(out, provider="cpu", text_encoder_3=None)
    ref = reference(folder, text_encoder_3=None, tokenizer_3=None)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, **PROMPTS)
    a, b = run_both(no_t5, ref, latents(1), **kw)
    assert np.abs(a - b).max() <= 1e-3
    with_t5 = ours(**kw, latents=latents(1).numpy(), height=SIZE, width=SIZE, output_type="np").images
    assert np.abs(with_t5 - a).max() > 1e-3                         # T5 does reach the transformer


def test_img2img_matches_diffusers(sd3_export, ours):
    """StableDiffusion3Img2ImgPipeline: strength not floored (7 steps x 0.7), VAE sample then noise from one seed."""
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(4).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    ref = reference(sd3_export[0], "StableDiffusion3Img2ImgPipeline")
    a, b = run_both(ours, ref, seed=8, image=image, strength=0.7, num_inference_steps=7, guidance_scale=5.0,
                    prompt="a red barn", negative_prompt="fog")
    assert np.abs(a - b).max() <= 1e-3


def test_dynamic_shifting_matches_diffusers(sd3_export, ours):
    """A scheduler config asking for use_dynamic_shifting: mu from the image's token count, as diffusers."""
    import diffusers

    ref = reference(sd3_export[0])
    cfg = dict(ref.scheduler.config) | {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    ref.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    a, b = run_both(ours, ref, latents(1), num_inference_steps=3, guidance_scale=1.0, prompt="a cat",
                    scheduler=from_config(cfg))
    assert np.abs(a - b).max() <= 1e-3


def fake_velocity(x, t):
    return (0.3 * x + 0.1 * np.sin(float(t) / 200 + np.arange(x.size).reshape(x.shape))).astype(np.float32)


FLOW_CONFIGS = [
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.3}),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, {"mu": 0.8}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "use_karras_sigmas": True}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 2.0, "use_exponential_sigmas": True, "shift_terminal": 0.1}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "invert_sigmas": True}, {}),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, {}),
]


@pytest.mark.parametrize("cls_name,config,options", FLOW_CONFIGS)
def test_flow_schedulers_match_diffusers_step_by_step(cls_name, config, options):
    import diffusers

    ref = getattr(diffusers, cls_name).from_config(config)
    ours = from_config(config | {"_class_name": cls_name})
    n = 6
    plan = ours.plan(n, **options)
    ref.set_timesteps(n, **options)
    np.testing.assert_allclose(plan.timesteps, ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(plan.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(0).standard_normal((1, 16, 4, 4)).astype(np.float32)
    y, state, ty = x, ours.init_state(plan), torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        y, state = ours.step(plan, state, i, fake_velocity(y, plan.timesteps[i]), y)
        ty = ref.step(torch.from_numpy(fake_velocity(ty.numpy(), t)), t, ty, return_dict=False)[0]
        np.testing.assert_allclose(y, ty.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls_name", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
@pytest.mark.parametrize("n,strength", [(7, 0.7), (10, 0.6), (5, 1.0), (4, 0.3)])
def test_flow_img2img_start_and_noise_match_diffusers(cls_name, n, strength):
    import diffusers

    ref = getattr(diffusers, cls_name).from_config({"shift": 3.0})
    ours = from_config({"_class_name": cls_name, "shift": 3.0})
    plan = ours.plan(n)
    ref.set_timesteps(n)
    t_start = int(max(n - min(n * strength, n), 0))                # StableDiffusion3Img2ImgPipeline.get_timesteps
    start = ours.img2img_start(plan, strength)
    assert start == t_start * ref.order
    ref.set_begin_index(start)
    x0, noise = (np.random.default_rng(k).standard_normal((1, 16, 2, 2)).astype(np.float32) for k in (1, 2))
    expected = ref.scale_noise(torch.from_numpy(x0), ref.timesteps[start:start + 1], torch.from_numpy(noise))
    np.testing.assert_allclose(ours.add_noise(plan, start, x0, noise), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_t5_tokenizer_matches_transformers():
    from transformers import T5TokenizerFast

    from runtime.t5_tokenizer import T5Tokenizer

    folder = tiny_folder("tiny-sd3") / "tokenizer_3"
    ours, ref = T5Tokenizer.from_folder(folder), T5TokenizerFast.from_pretrained(folder)
    prompts = ["a red barn at dusk", "", "  A  Photo of the CAT!! ", "snow fog rain " * 100,
               "émoji 🙂 <extra_id_3> </s> tail", "a\tb\nc"]
    for length in (8, 77, 256):
        with pytest.warns(UserWarning, match="truncated"):
            got = ours(prompts, length)
        want = ref(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        np.testing.assert_array_equal(got, want.input_ids)
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours(prompts, 513)


def test_bad_requests_fail_in_one_line(ours):
    from PIL import Image

    image = Image.new("RGB", (SIZE, SIZE))
    cases = [(dict(max_sequence_length=600), "max_sequence_length"),
             (dict(scheduler="ddim"), "flow-matching"),
             (dict(height=72, width=64), "multiples of 16"),
             (dict(prompt_2=["a", "b"]), "prompt_2"),
             (dict(image=image, strength=0.0, num_inference_steps=2), "no denoising step")]
    for kw, words in cases:
        with pytest.raises(UserError, match=words):
            ours(**({"prompt": "a cat", "num_inference_steps": 1, "height": SIZE, "width": SIZE} | kw))
    from runtime.request import GenerationRequest
    for kw, words in [(dict(image=image, mask_image=image), "inpainting"), (dict(prompt_syntax="a1111"), "A1111")]:
        with pytest.raises(UserError, match=words):
            ours.run(GenerationRequest.create("a cat", num_inference_steps=1, height=SIZE, width=SIZE, **kw))


def generate(folder, out, *extra):
    """`runtime generate` in-process: a small seeded SD3 request plus extra options."""
    from click.testing import CliRunner

    from runtime.cli import main

    args = ["generate", "--model", folder, "--prompt", "a red barn", "--negative-prompt", "fog", "--steps", 2,
            "--guidance", 5, "--width", SIZE, "--height", SIZE, "--seed", 7, "--quiet", "--out", out, *extra]
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_sd3_prompts_match_diffusers(sd3_export, tmp_path):
    """--prompt-2/-3, --negative-prompt-3 and --max-sequence-length reach diffusers' prompt_2/prompt_3/...;
    a different --prompt-3 alone changes the image, and leaving it out means the prompt, as diffusers."""
    folder, out, _ = sd3_export
    shared = ["--prompt-2", "a blue barn at dusk", "--negative-prompt-3", "blurry", "--max-sequence-length", 32]
    images = {}
    for name, extra in (("snow", ["--prompt-3", "an old barn in the snow"]), ("default", [])):
        r = generate(out, tmp_path / f"{name}.npy", *shared, *extra)
        assert r.exit_code == 0, r.output
        images[name] = np.load(tmp_path / f"{name}.npy")
    assert np.abs(images["snow"] - images["default"]).max() > 1e-3           # T5's own prompt reaches the image
    ref = reference(folder)
    kw = dict(prompt="a red barn", negative_prompt="fog", prompt_2="a blue barn at dusk", negative_prompt_3="blurry",
              max_sequence_length=32, num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE,
              output_type="np")
    for name, prompt_3 in (("snow", "an old barn in the snow"), ("default", None)):
        with torch.no_grad():
            want = ref(**kw, prompt_3=prompt_3, generator=torch.Generator().manual_seed(7)).images
        assert np.abs(images[name] - want).max() <= 1e-3, name


def test_cli_sd3_options_refused_in_one_line(sd3_export, tiny_export, tmp_path):
    """A T5 length outside [2, 512] on an SD3 folder, and any SD3 option on a folder it would be ignored on."""
    cases = [(sd3_export[1], ["--max-sequence-length", 600], "max_sequence_length"),
             (sd3_export[1], ["--max-sequence-length", 1], "max_sequence_length"),
             (tiny_export[0], ["--prompt-3", "snow", "--max-sequence-length", 77],
              "--prompt-3, --max-sequence-length apply to SD3 models")]
    for folder, extra, words in cases:
        r = generate(folder, tmp_path / "x.png", *extra)
        lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert r.exit_code == 2 and len(lines) == 1 and words in lines[0], r.output
        assert not (tmp_path / "x.png").exists()


BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'sentencepiece'):
            raise ImportError(f'{name} is blocked: the runtime must not need it')
sys.meta_path.insert(0, _Block())
from runtime.cli import main
main()
"""


def test_runtime_generate_on_an_sd3_folder_without_torch(sd3_export, tmp_path):
    out = tmp_path / "sd3.png"
    cmd = [sys.executable, "-c", BLOCK_TORCH, "generate", "--model", str(sd3_export[1]), "--prompt", "a cat",
           "--steps", "2", "--width", "96", "--height", "64", "--seed", "1", "--quiet", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    from PIL import Image
    with Image.open(out) as im:
        assert im.size == (96, 64) and "Steps: 2" in im.text["parameters"]


def without_t5(folder: Path, dest: Path) -> Path:
    """A copy of an SD3 folder with text_encoder_3 / tokenizer_3 removed, as model_index marks them."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((dest / "model_index.json").read_text())
    index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    (dest / "model_index.json").write_text(json.dumps(index))
    return dest


def test_folder_without_t5_has_no_t5_graph(tmp_path):
    from sdexport.sources import load_components, resolve
    from sdexport.specs import component_specs

    components = load_components(resolve(str(without_t5(tiny_folder("tiny-sd3"), tmp_path / "no-t5"))))
    assert [s.name for s in component_specs(components.configs)] == [
        "text_encoder", "text_encoder_2", "transformer", "vae_encoder", "vae_decoder"]


@pytest.mark.slow
def test_export_without_t5_matches_diffusers(tmp_path):
    """A folder shipped without T5 exports five graphs; the runtime fills T5's part with zeros, as diffusers."""
    source = without_t5(tiny_folder("tiny-sd3"), tmp_path / "no-t5")
    convert(ConvertConfig(str(source), load_profile("cpu"), tmp_path / "out"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "out", provider="cpu")
    assert not pipe.use_t5 and "tokenizer_3" not in pipe.model.tokenizers
    ref = reference(source, text_encoder_3=None, tokenizer_3=None)
    a, b = run_both(pipe, ref, latents(1), num_inference_steps=3, guidance_scale=4.0, **PROMPTS)
    assert np.abs(a - b).max() <= 1e-3


@pytest.mark.slow
def test_cuda_profile_keeps_t5_fp32(tmp_path):
    """GPU targets: the transformer and CLIPs in fp16 (PSNR-checked here on the CPU), T5 kept fp32 (its overflow)."""
    report = convert(ConvertConfig("tiny-sd3", load_profile("cuda"), tmp_path / "cuda"))
    graphs = json.loads((tmp_path / "cuda" / "sdexport.json").read_text())["graphs"]
    assert graphs["text_encoder_3"]["precision"] == "fp32" and graphs["transformer"]["precision"] == "fp16"
    assert "com.microsoft.MultiHeadAttention" in graphs["transformer"]["custom_ops"]      # the MMDiT fusion
    fp16 = [c for c in report.checks if c.component == "transformer" and c.stage == "optimised"]
    assert len(fp16) == 2 and all(c.ran and c.ok and c.min_psnr_db for c in fp16)


def test_cli_defaults_follow_the_family(sd3_export, tiny_export):
    """`runtime generate` without --steps/--guidance: diffusers' SD3 defaults (28, 7.0) on SD3 folders, ours
    (25, 7.5) elsewhere; given values are kept."""
    from runtime.cli_sd3 import family_defaults as _family_defaults

    assert _family_defaults(sd3_export[1], None, None) == (28, 7.0)
    assert _family_defaults(tiny_export[0], None, None) == (25, 7.5)
    assert _family_defaults(sd3_export[1], 4, 3.0) == (4, 3.0)
