"""CLIP skip (A1111 "Clip skip", diffusers' clip_skip + 1) end to end, its export outputs, and TensorRT text ranges.

The model is the tiny one with a 4-layer text encoder (so that Clip skip 2 and 3 both name real layers) whose final
LayerNorm bias is shifted (emphasis' mean rescaling needs states with a clear mean, see test_a1111_conditioning).
Plain syntax is compared with diffusers' StableDiffusionPipeline(clip_skip=N-1), which applies it to the prompt only;
a1111 syntax with the reference of test_a1111_conditioning, which applies it to both prompts as A1111 does.
"""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime.cli import main
from runtime.errors import UserError
from runtime.request import GenerationRequest
from sdexport.profiles import load_profile
from conftest import SHIFTED_LAYERS as LAYERS
from runtime.pipeline import StableDiffusionPipeline
from test_a1111_conditioning import BREAK, CASES, GUIDANCE, LONG, SIZE, STEPS, Reference


@pytest.fixture(scope="module")
def deep(shifted_tiny):
    """(diffusers folder, our pipeline on its cpu export): the tiny model with a 4-layer, shifted text encoder."""
    return shifted_tiny[0], StableDiffusionPipeline.from_pretrained(shifted_tiny[1], provider="cpu")


@pytest.fixture(scope="module")
def ref(deep):
    reference = Reference(deep[0])
    # diffusers 0.42's clip_skip reads text_encoder.text_model.final_layer_norm; transformers 5's CLIPTextModel holds
    # final_layer_norm itself. Alias it (outside nn.Module's registry, so no module cycle).
    reference.pipe.text_encoder.__dict__.setdefault("text_model", reference.pipe.text_encoder)
    return reference


@pytest.fixture(scope="module")
def latents():
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(3))


def run_ours(pipe, prompt, negative, latents, clip_skip, syntax):
    return pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                width=SIZE, latents=latents.numpy(), scheduler="ddim", output_type="np", prompt_syntax=syntax,
                clip_skip=clip_skip).images


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_plain_matches_diffusers_clip_skip(deep, ref, latents, clip_skip):
    prompt, negative = "a lighthouse at dusk, oil painting", "blurry, lowres"
    a = run_ours(deep[1], prompt, negative, latents, clip_skip, "plain")
    with torch.no_grad():
        b = ref.pipe(prompt, negative_prompt=negative, latents=latents, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="np",
                     clip_skip=clip_skip - 1).images
    assert np.abs(a - b).max() <= 1e-3
    unskipped = run_ours(deep[1], prompt, negative, latents, 1, "plain")
    assert np.abs(a - unskipped).max() > 1e-2                    # it changes the image


@pytest.mark.parametrize("clip_skip", [2, 3])
@pytest.mark.parametrize("case", ["weighted", "long"])
def test_a1111_matches_reference(deep, ref, latents, clip_skip, case):
    if case == "long":
        prompt, runs = LONG + "(golden hour:1.2)", [(LONG, 1.0), ("golden hour", 1.2)]
        n = len(ref.chunks(runs))
        negative = " BREAK ".join(["blurry"] * n)                 # same chunk count: diffusers needs equal lengths
        negative_runs = [r for i in range(n) for r in ([BREAK] if i else []) + [("blurry", 1.0)]]
    else:
        prompt, runs, negative, negative_runs = CASES[case]
    a = run_ours(deep[1], prompt, negative, latents, clip_skip, "a1111")
    b = ref.images(runs, negative_runs, latents, clip_skip)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-3


def test_clip_skip_one_is_the_default(deep, latents):
    pipe = deep[1]
    default = pipe("a red cat", num_inference_steps=2, height=SIZE, width=SIZE, latents=latents.numpy(),
                   output_type="np").images
    one = pipe("a red cat", num_inference_steps=2, height=SIZE, width=SIZE, latents=latents.numpy(),
               output_type="np", clip_skip=1).images
    assert np.array_equal(default, one)


@pytest.mark.parametrize("value", [0, -1, "2", 2.0, True])
def test_request_refuses_bad_values(value):
    with pytest.raises(UserError, match="clip_skip must be an integer >= 1") as e:
        GenerationRequest("a cat", clip_skip=value)
    assert "\n" not in str(e.value)


def _generate(folder, tmp_path, *extra, name="x.png"):
    return CliRunner().invoke(main, ["generate", "--model", str(folder), "--prompt", "a cat", "--steps", "2", "--width",
                                     "64", "--height", "64", "--seed", "1", "--quiet", "--out", str(tmp_path / name),
                                     *extra], catch_exceptions=False)


def _one_line_error(r, *words):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_cli_refuses_more_skip_than_layers(deep, tmp_path):
    r = _generate(deep[1].model.folder, tmp_path, "--clip-skip", str(LAYERS + 1))
    _one_line_error(r, f"clip skip {LAYERS + 1}", f"{LAYERS} layers")
    _one_line_error(_generate(deep[1].model.folder, tmp_path, "--clip-skip", "0"), "clip_skip", ">= 1")
    assert not (tmp_path / "x.png").exists()


def test_folder_without_clip_skip_outputs_asks_for_a_re_export(tiny_export, tmp_path):
    """A folder whose text encoder lacks the outputs (exported before them, or by Optimum) refuses clip skip > 1."""
    import onnx

    folder = tmp_path / "old"
    shutil.copytree(tiny_export[0], folder)
    (folder / "sdexport.json").unlink()                        # as Optimum writes it: no manifest to rewrite
    graph = folder / "text_encoder" / "model.onnx"
    model = onnx.load(str(graph))
    keep = [o for o in model.graph.output if not o.name.startswith("normed_hidden_states.")]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(graph))
    assert _generate(folder, tmp_path, name="one.png").exit_code == 0
    _one_line_error(_generate(folder, tmp_path, "--clip-skip", "2"), "re-export", "clip skip")


def test_infotext_round_trip(deep, tmp_path):
    from PIL import Image

    folder = deep[1].model.folder
    assert _generate(folder, tmp_path, "--clip-skip", "2", name="two.png").exit_code == 0
    assert _generate(folder, tmp_path, name="one.png").exit_code == 0
    text = Image.open(tmp_path / "two.png").text["parameters"]
    assert "Clip skip: 2" in text and "Clip skip" not in Image.open(tmp_path / "one.png").text["parameters"]
    assert "Prompt syntax: plain" in text          # plain skips on the prompt only; A1111 would on the negative too
    r = CliRunner().invoke(main, ["generate", "--model", str(folder), "--from-png", str(tmp_path / "two.png"),
                                  "--quiet", "--out", str(tmp_path / "again.png")], catch_exceptions=False)
    assert r.exit_code == 0 and "ignored" not in r.stderr, r.output
    again = Image.open(tmp_path / "again.png")
    assert again.text["parameters"] == text
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "two.png")))


def test_export_adds_verified_normed_outputs(tiny_export):
    """SD 1.x/2.x text encoders gain normed_hidden_states.1 .. L-1, listed in the manifest and verified."""
    from runtime.manifest import read_manifest

    folder, report = tiny_export
    outputs = [t.name for t in read_manifest(folder).graphs["text_encoder"].outputs]
    assert outputs == ["last_hidden_state", "pooler_output", "normed_hidden_states.1"]     # tiny: 2 layers
    checks = [c for c in report.checks if c.component == "text_encoder"]
    assert checks and all(c.ran and c.ok for c in checks)


def test_last_hidden_state_unchanged_by_the_new_outputs(tiny_components, tmp_path):
    """clip_skip 1 reads exactly what a graph without the CLIP skip outputs gives."""
    import onnxruntime as ort

    from sdexport.export import export_component
    from sdexport.optimize import optimize_component
    from sdexport.specs import component_specs, dims

    spec = next(s for s in component_specs(tiny_components.configs) if s.name == "text_encoder")
    d = dims(tiny_components.configs, *spec.sample_cases(tiny_components.configs)[0])
    inputs, profile, got = spec.sample_inputs(d), load_profile("cpu"), []
    for i, s in enumerate((spec, replace(spec, outputs=spec.outputs[:2]))):
        export_component(s, tiny_components.module(s), inputs, tmp_path / str(i), profile.opset)
        optimize_component(tmp_path / str(i) / "model.onnx", s, profile)
        session = ort.InferenceSession(str(tmp_path / str(i) / "model.onnx"), providers=["CPUExecutionProvider"])
        got.append(session.run(["last_hidden_state", "pooler_output"], {"input_ids": inputs["input_ids"].numpy()}))
    assert all(np.array_equal(a, b) for a, b in zip(*got))


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_tensorrt_profile_covers_three_chunks(model):
    """The UNet's text states take 77, 154 and 231 tokens (1 to 3 chunks); text encoders their 77-id rows."""
    from sdexport.profiles import tensorrt_shapes
    from sdexport.sources import load_components, resolve
    from sdexport.specs import component_specs

    profile, configs = load_profile("tensorrt"), load_components(resolve(model)).configs
    assert profile.shapes["sequence"].as_list() == [77, 77, 231]
    for spec in component_specs(configs):
        shapes = tensorrt_shapes(profile, spec, configs)
        ranges = [{n: [int(v) for v in s.split("x")] for n, s in (i.split(":") for i in shapes[k].split(","))}
                  for k in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")]
        lo, _, hi = ranges
        if spec.is_text:
            assert lo["input_ids"] == [1, 77] and hi["input_ids"] == [4, 77], shapes
        if "encoder_hidden_states" in lo:
            assert all(lo["encoder_hidden_states"][1] <= n <= hi["encoder_hidden_states"][1] for n in (77, 154, 231))
            assert hi["encoder_hidden_states"][0] == hi["sample"][0] == 8          # 4 images, both guidance halves
        assert set(lo) == {t.name for t in spec.inputs if t.shape}               # every dynamic input, in order
