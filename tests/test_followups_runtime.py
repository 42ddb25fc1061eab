"""Runtime behaviour as users hit it: edited configs, img2img defaults, error lines, input dtypes, file modes,
the manifest's licence and round trip, the shared request object, and helpers defined once."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from runtime.cli import main as runtime_main
from runtime.errors import UserError
from runtime.pipeline import StableDiffusionPipeline


def rt(*args):
    """`runtime ARGS` in-process."""
    return CliRunner().invoke(runtime_main, [str(a) for a in args], catch_exceptions=False)


def gen_args(folder, out, *extra):
    """A small, fast generate command plus extra options."""
    return ["generate", "--model", folder, "--prompt", "a cat", "--steps", "3", "--width", "64", "--height", "64",
            "--seed", "5", "--quiet", "--out", out, *extra]


def ok(result):
    """Exit 0, no traceback."""
    assert result.exit_code == 0, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    return result


def error(result, *words) -> str:
    """Exit 2 with one `error:` line naming every word."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


@pytest.fixture
def model(tiny_export, tmp_path):
    """A private copy of the cpu export that a test may edit."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_export[0], dest)
    return dest


def set_scheduler_class(folder: Path, class_name: str) -> None:
    """Edit scheduler_config.json as a diffusers user would."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"_class_name": class_name}, indent=4))


# -- 1. an edited scheduler config is honoured; graphs stay integrity-checked -----------------------------

def test_edited_scheduler_config_is_used_and_reported(model, tiny_export, tmp_path):
    set_scheduler_class(model, "EulerDiscreteScheduler")
    ok(rt(*gen_args(model, tmp_path / "edited.npy")))
    ok(rt(*gen_args(model, tmp_path / "edited-noverify.npy", "--no-verify")))
    ok(rt(*gen_args(tiny_export[0], tmp_path / "euler.npy", "--scheduler", "euler")))
    edited = np.load(tmp_path / "edited.npy")
    assert np.array_equal(edited, np.load(tmp_path / "euler.npy"))
    assert np.array_equal(edited, np.load(tmp_path / "edited-noverify.npy"))

    info = ok(rt("info", model)).stdout
    assert "scheduler/scheduler_config.json (edited since export)" in info
    assert "edited since export" not in ok(rt("info", tiny_export[0])).stdout

    unet = model / "unet" / "model.onnx"
    unet.write_bytes(unet.read_bytes()[:1000])
    for extra in ((), ("--no-verify",)):
        error(rt(*gen_args(model, tmp_path / "x.npy", *extra)), "model.onnx", "truncated")


def test_edited_config_is_validated_by_parsing(model, tmp_path):
    set_scheduler_class(model, "NoSuchScheduler")
    error(rt(*gen_args(model, tmp_path / "x.npy")), "unknown scheduler", "NoSuchScheduler")
    (model / "scheduler" / "scheduler_config.json").write_text("{half")
    error(rt(*gen_args(model, tmp_path / "x.npy")), "scheduler_config.json", "not valid JSON")
    (model / "unet" / "config.json").write_text("[1, 2]")
    error(rt(*gen_args(model, tmp_path / "x.npy")), "unet", "config.json", "JSON object")


def test_which_files_are_integrity_checked():
    from runtime.manifest import integrity_checked

    for rel in ("unet/model.onnx", "unet/model.onnx_data", "tokenizer/vocab.json", "tokenizer_2/merges.txt",
                "tokenizer/tokenizer_config.json", "text_encoder/model.onnx"):
        assert integrity_checked(rel), rel
    for rel in ("scheduler/scheduler_config.json", "unet/config.json", "vae_decoder/config.json", "model_index.json"):
        assert not integrity_checked(rel), rel


# -- 2. img2img strength: one default for the API and the CLI --------------------------------------------

def test_img2img_default_strength_is_the_same_in_api_and_cli(tiny_export, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    ok(rt(*gen_args(tiny_export[0], tmp_path / "cli.npy", "--init-image", init)))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")
    kw = dict(num_inference_steps=3, height=64, width=64, seed=5, output_type="np")
    with Image.open(init) as im:
        api = pipe("a cat", image=im.copy(), **kw).images
        explicit = pipe("a cat", image=im.copy(), strength=0.8, **kw).images
        full = pipe("a cat", image=im.copy(), strength=1.0, **kw).images
    assert np.array_equal(np.load(tmp_path / "cli.npy"), api)
    assert np.array_equal(api, explicit) and not np.array_equal(api, full)


def test_strength_defaults_follow_diffusers_per_mode():
    from runtime.request import GenerationRequest

    image = Image.new("RGB", (64, 64))
    assert GenerationRequest("a").effective_strength == 1.0
    assert GenerationRequest("a", image=image).effective_strength == 0.8
    assert GenerationRequest("a", image=image, mask_image=image).effective_strength == 1.0
    assert GenerationRequest("a", image=image, strength=0.3).effective_strength == 0.3


# -- 3. an error starts on its own line, no bar for work that never ran ----------------------------------

def test_unknown_scheduler_error_is_not_on_the_progress_line(tiny_export, tmp_path):
    args = [a for a in gen_args(tiny_export[0], tmp_path / "x.png", "--scheduler", "bogus-sampler") if a != "--quiet"]
    r = rt(*args)
    assert r.exit_code == 2
    assert r.stderr.splitlines()[0].startswith("error:"), r.stderr
    assert "bogus-sampler" in r.stderr and "denoising" not in r.stderr


def test_error_after_some_steps_starts_its_own_line(model, tmp_path, monkeypatch):
    from runtime.session import Graph

    real, calls = Graph.__call__, []

    def nan_at_step_two(self, **feeds):
        outs = real(self, **feeds)
        if self.name == "unet":
            calls.append(1)
            if len(calls) == 2:
                return {k: np.full_like(v, np.nan) for k, v in outs.items()}
        return outs

    monkeypatch.setattr(Graph, "__call__", nan_at_step_two)
    r = rt(*[a for a in gen_args(model, tmp_path / "x.png") if a != "--quiet"])
    assert r.exit_code == 2
    assert "denoising" in r.stderr                    # the bar was drawn: step 1 ran
    lines = r.stderr.split("\n")                      # as a log file shows it: the bar's "\r" redraws are one line
    assert lines[-2].startswith("error: latents became NaN/Inf at step 2") and lines[-1] == "", r.stderr


# -- 4. input dtypes are checked, not silently cast -------------------------------------------------------

def test_float64_sample_is_refused_naming_the_input(tiny_export):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")
    unet = pipe.model.graph("unet")
    feeds = {"sample": np.zeros((1, 4, 8, 8)), "timestep": np.float32(1),
             "encoder_hidden_states": np.zeros((1, 77, unet.inputs["encoder_hidden_states"].shape[2]), np.float32)}
    if unet.input_rank("timestep") == 1:
        feeds["timestep"] = np.ones((1,), np.float32)
    with pytest.raises(UserError) as e:
        unet(**feeds)
    assert str(e.value) == "unet: input sample has dtype float64, the graph expects float32"
    unet(**feeds | {"sample": feeds["sample"].astype(np.float32)})


def test_float64_latents_from_the_caller_are_used_as_float32(tiny_export):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    a = pipe("a cat", latents=latents, **kw).images
    b = pipe("a cat", latents=latents.astype(np.float32), **kw).images
    assert np.array_equal(a, b)


def test_int32_input_ids_graph_from_another_exporter(tiny_export, tmp_path):
    """A folder whose text encoder declares int32 input_ids: the pipeline feeds exactly that type."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "int32"
    shutil.copytree(tiny_export[0], folder)
    (folder / "sdexport.json").unlink()
    path = folder / "text_encoder" / "model.onnx"
    graph_model = onnx.load(str(path))
    ids = next(i for i in graph_model.graph.input if i.name == "input_ids")
    ids.type.tensor_type.elem_type = TensorProto.INT32
    for node in graph_model.graph.node:
        node.input[:] = ["input_ids_i64" if n == "input_ids" else n for n in node.input]
    graph_model.graph.node.insert(0, helper.make_node("Cast", ["input_ids"], ["input_ids_i64"], to=TensorProto.INT64))
    onnx.save(graph_model, str(path))
    ok(rt(*gen_args(folder, tmp_path / "int32.npy")))
    ok(rt(*gen_args(tiny_export[0], tmp_path / "int64.npy")))
    assert np.array_equal(np.load(tmp_path / "int32.npy"), np.load(tmp_path / "int64.npy"))


# -- 5. written files follow the umask ---------------------------------------------------------------------

@pytest.fixture
def umask_022():
    """Run under umask 022, as most shells do."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_exported_folder_is_readable_by_others(tmp_path, umask_022):
    from sdexport.cli import main as sdexport_main

    out = tmp_path / "export"
    r = CliRunner().invoke(sdexport_main, ["convert", "--model", "tiny", "--target", "cpu", "--out", str(out),
                                           "--no-verify", "--quiet"], catch_exceptions=False)   # modes, not numbers
    assert r.exit_code == 0, r.output
    modes = _modes(out) | {".": stat.S_IMODE(out.stat().st_mode)}
    wrong = {rel: oct(m) for rel, m in modes.items() if m != (0o755 if (out / rel).is_dir() else 0o644)}
    assert not wrong and "unet/model.onnx" in modes

    ok(rt(*gen_args(out, tmp_path / "img.png")))
    ok(rt(*gen_args(out, tmp_path / "img.npy")))
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("img.png", "img.npy")} == {0o644}


def test_atomic_writes_follow_a_stricter_umask(tmp_path):
    from runtime.atomic import atomic_file, staged_dir

    old = os.umask(0o027)
    try:
        with staged_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
        with atomic_file(tmp_path / "g") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o640


# -- 6. licence and the manifest's one JSON form -----------------------------------------------------------

def test_manifest_round_trips_through_json(tiny_export):
    from runtime.manifest import manifest_from_dict, read_manifest

    m = read_manifest(tiny_export[0])
    d = json.loads(json.dumps(m.to_dict()))
    assert manifest_from_dict(d) == m and manifest_from_dict(d).to_dict() == m.to_dict()
    licensed = dataclasses.replace(m, license="creativeml-openrail-m")
    again = manifest_from_dict(json.loads(json.dumps(licensed.to_dict())))
    assert again == licensed and again.license == "creativeml-openrail-m"


def test_license_in_info_and_older_manifests(model):
    from runtime.manifest import read_manifest

    path = model / "sdexport.json"
    data = json.loads(path.read_text())
    data.pop("license", None)
    path.write_text(json.dumps(data))
    assert read_manifest(model).license == "unknown"
    assert "  license     unknown" in ok(rt("info", model)).stdout
    path.write_text(json.dumps(data | {"license": "openrail++"}))
    assert "  license     openrail++" in ok(rt("info", model)).stdout
    path.write_text(json.dumps(data | {"license": 3}))
    error(rt("info", model), "license")


# -- 7. the request object -------------------------------------------------------------------------------

def test_request_is_frozen_and_validated_once():
    from runtime.request import DEFAULTS, GenerationRequest

    r = GenerationRequest.create(["a", "b"], num_inference_steps=None, negative_prompt=["x", "y"], seed=[1, 2, 3, 4],
                                 num_images_per_prompt=2)
    assert r.prompt == ("a", "b") and r.negative_prompt == ("x", "y") and r.seed == (1, 2, 3, 4)
    assert r.num_inference_steps == DEFAULTS["num_inference_steps"] == 50 and r.total_images == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.guidance_scale = 3.0
    for bad, word in ((dict(num_inference_steps=0), "steps"), (dict(guidance_scale=float("nan")), "guidance"),
                      (dict(strength=1.5), "strength"), (dict(output_type="jpeg"), "output_type"),
                      (dict(mask_image=Image.new("L", (8, 8))), "init image"), (dict(seed=[1, 2]), "seed"),
                      (dict(num_images_per_prompt=0), "num_images_per_prompt"), (dict(height=-8), "height")):
        with pytest.raises(UserError, match=word) as e:
            GenerationRequest("a", **bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no prompt"):
        GenerationRequest([])


def test_run_takes_the_request_the_call_builds(tiny_export):
    from runtime.request import GenerationRequest

    pipe = StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")
    request = GenerationRequest("a cat", num_inference_steps=2, height=64, width=64, seed=3, output_type="np")
    via_run = pipe.run(request).images
    via_call = pipe("a cat", num_inference_steps=2, height=64, width=64, seed=3, output_type="np").images
    assert np.array_equal(via_run, via_call)


# -- 8. helpers defined once -------------------------------------------------------------------------------

def test_shared_helpers(tiny_export):
    from runtime.model import read_facts, vae_scale_factor
    from runtime.tokenizer import repair_surrogates

    assert repair_surrogates("half \ud83d pair") == "half \ufffd pair"
    assert repair_surrogates("\ud83d\ude00") == "\U0001f600" and repair_surrogates("plain") == "plain"
    assert vae_scale_factor({"block_out_channels": [128, 256, 512, 512]}) == 8
    vae = json.loads((tiny_export[0] / "vae_decoder" / "config.json").read_text())
    assert read_facts(tiny_export[0]).vae_scale_factor == vae_scale_factor(vae)


def test_size_the_unet_cannot_halve_is_refused_in_one_line(tiny_export, tmp_path):
    """The tiny UNet halves its latents once: 72 px (9 latent cells) cannot come back up to the same size."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export[0])
    with pytest.raises(UserError, match=r"^width and height must be positive multiples of 16 for this model, got 72x64$"):
        pipe("a", width=72, height=64, num_inference_steps=1)
    res = CliRunner().invoke(runtime_main, ["generate", "--model", str(tiny_export[0]), "--prompt", "a",
                                            "--width", "72", "--height", "64", "--out", str(tmp_path / "x.png")])
    assert res.exit_code != 0 and "multiples of 16" in res.output and "Traceback" not in res.output
    assert pipe("a", width=80, height=64, num_inference_steps=1, output_type="np").images.shape == (1, 64, 80, 3)
