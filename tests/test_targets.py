"""Per-target exports of the tiny model: profiles, fused graphs, precision, provider checks and shape ranges."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from runtime import metrics
from runtime.errors import ModelFolderError, UserError
from runtime.manifest import read_manifest
from runtime.model import open_model
from runtime.pipeline import StableDiffusionPipeline
from sdexport.onnx_io import custom_ops
from sdexport.profiles import PROFILE_DIR, ShapeRange, load_profile, parse_shapes_option, profile_names
from sdexport.structure import check_structure
from sdexport.verify import graph_precision

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")   # an SD 1.x export
GPU_TARGETS = ("cuda", "tensorrt", "directml")
# contrib ops without CPU kernels (Attention and MultiHeadAttention have them, and the cpu profile fuses them)
GPU_ONLY_OPS = {"NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"}
# fusion switch -> the com.microsoft op it puts into the UNet
FUSED_OPS = {"enable_nhwc_conv": "NhwcConv", "enable_group_norm": "GroupNorm", "enable_skip_group_norm": "SkipGroupNorm",
             "enable_bias_splitgelu": "BiasSplitGelu", "enable_bias_add": "BiasAdd",
             "use_multi_head_attention": "MultiHeadAttention"}


# -- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exports(tiny_targets):
    """target -> the tiny model's export for it (shared by every test module of the run)."""
    return tiny_targets


def _user_profile_text(name: str, **replace) -> str:
    """cpu.toml with its name and some lines replaced ("key = value" lines, matched by key)."""
    lines = []
    for line in (PROFILE_DIR / "cpu.toml").read_text().splitlines():
        key = line.split("=")[0].strip()
        lines.append(f"{key} = {replace.pop(key)}" if key in replace else line)
    assert not replace, replace
    return "\n".join(lines).replace('name = "cpu"', f'name = "{name}"', 1) + "\n"


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """(folder, profile file) of `sdexport convert --profile my-int8.toml`: cpu.toml renamed, smaller shapes, int8 unet."""
    from sdexport.cli import main

    d = tmp_path_factory.mktemp("user-profile")
    path = d / "my-int8.toml"
    path.write_text(_user_profile_text("cpu-int8-small", quantize_unet="true", batch="[1, 1, 2]",
                                       height="[64, 128, 256]", width="[64, 128, 256]"))
    out = d / "export"
    r = CliRunner().invoke(main, ["convert", "--model", "tiny", "--profile", str(path), "--out", str(out), "--quiet"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "target cpu-int8-small" in r.stdout
    return out, path


def _graph(folder, name):
    return folder / name / "model.onnx"


def _load(folder, name):
    return onnx.load(str(_graph(folder, name)), load_external_data=False)


def _contrib_ops(model) -> set:
    return {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}


def one_line_error(result, *words):
    """Exit 2, exactly one error line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# -- profiles ------------------------------------------------------------------------------------------------

def test_shipped_profiles():
    assert profile_names() == ["cpu", "cuda", "directml", "openvino", "tensorrt"]


@pytest.mark.parametrize("target", ["cpu", "cuda", "tensorrt", "directml"])
def test_shipped_profile_loads_and_validates(target):
    p = load_profile(target)
    assert p.name == target
    assert p.provider.endswith("ExecutionProvider")
    assert p.precision in ("fp32", "fp16")
    assert {"batch", "height", "width"} <= set(p.shapes) <= {"batch", "height", "width", "sequence"}
    for axis, r in p.shapes.items():
        assert isinstance(r, ShapeRange) and 0 < r.min <= r.opt <= r.max
        step = {"batch": 1, "sequence": 77}.get(axis, 8)               # pixels: multiples of 8; text: CLIP chunks
        assert not (r.min % step or r.opt % step or r.max % step)
    assert set(p.keep_fp32) <= set(COMPONENTS) | {"text_encoder_3"}          # SD3's T5 on GPU targets
    assert len(p.hash) == 64 and p.source.endswith(f"{target}.toml")
    assert load_profile(str(PROFILE_DIR / f"{target}.toml")) == p     # by path, same profile


def test_profiles_command_shows_cuda():
    from sdexport.cli import main

    r = CliRunner().invoke(main, ["profiles", "cuda"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.startswith("cuda: ")
    for words in ("CUDAExecutionProvider", "fp16", "vae_encoder", "vae_decoder", "min 256, opt 512, max 1024",
                  "enable_group_norm"):
        assert words in out, (words, out)


@pytest.mark.parametrize("replace, words", [
    ({"opset": "17\nturbo = true"}, ["unknown key", "turbo"]),
    ({"precision": '"int4"'}, ["precision", "int4"]),
    ({"height": "[512, 256, 128]"}, ["shapes.height"]),
    ({"width": "[60, 512, 2048]"}, ["shapes.width", "multiples of 8"]),
    ({"keep_fp32": '["vae"]'}, ["keep_fp32", "vae"]),
    ({"enable_gelu": '"yes"'}, ["fusions.enable_gelu", "true or false"]),
    ({"enable_gelu": "true\nenable_group_nrom = true"}, ["fusions.enable_group_nrom", "not a fusion switch"]),
], ids=["unknown-key", "precision", "min-over-max", "not-multiple-of-8", "keep_fp32", "fusion-not-bool",
        "fusion-typo"])
def test_invalid_profile_names_the_bad_key(tmp_path, replace, words):
    path = tmp_path / "bad.toml"
    path.write_text(_user_profile_text("bad", **replace))
    with pytest.raises(UserError) as e:
        load_profile(str(path))
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_invalid_profile_on_the_command_line(tmp_path):
    from sdexport.cli import main

    path = tmp_path / "bad.toml"
    path.write_text(_user_profile_text("bad", precision='"fp8"'))
    r = CliRunner().invoke(main, ["convert", "--model", "tiny", "--profile", str(path), "--out", str(tmp_path / "o")],
                           catch_exceptions=False)
    one_line_error(r, "precision", "fp8")
    assert not (tmp_path / "o").exists()


def test_shapes_option():
    s = parse_shapes_option("512x512@1,768x768@1-4")
    assert s == {"width": ShapeRange(512, 512, 768), "height": ShapeRange(512, 512, 768), "batch": ShapeRange(1, 1, 4)}
    s = parse_shapes_option("640x384@2")
    assert (s["width"], s["height"], s["batch"]) == (ShapeRange(640, 640, 640), ShapeRange(384, 384, 384),
                                                     ShapeRange(2, 2, 2))
    s = parse_shapes_option(" 768x512@2 , 512x768@1-3")   # first entry is the optimum, ranges cover all
    assert (s["width"], s["height"], s["batch"]) == (ShapeRange(512, 768, 768), ShapeRange(512, 512, 768),
                                                     ShapeRange(1, 2, 3))


@pytest.mark.parametrize("text", ["512by512", "512x512", "512x512@", "x512@1", "512x512@1-", "512x512@1,",
                                  "500x512@1", "512x516@1", "512x512@0", "512x512@4-1", ""])
def test_bad_shapes_option(text):
    with pytest.raises(UserError, match="--shapes"):
        parse_shapes_option(text)


# -- a user's own profile (and int8) ---------------------------------------------------------------------------

def test_user_profile_is_recorded_in_the_manifest(int8_export):
    folder, path = int8_export
    m = read_manifest(folder)
    assert m.target == "cpu-int8-small"
    assert m.profile == {"name": "cpu-int8-small", "file": str(path),
                         "hash": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert m.shape_ranges == {"batch": [1, 1, 2], "height": [64, 128, 256], "width": [64, 128, 256]}
    with pytest.raises(ModelFolderError, match=r"\[64, 256\]"):
        m.check_shape(1, 512, 512)


def test_int8_unet_has_integer_weights(int8_export):
    folder, _ = int8_export
    unet = _load(folder, "unet")
    ops = {n.op_type for n in unet.graph.node}
    # dynamic quantisation (DynamicQuantizeLinear + MatMulInteger, which the CPU pre-optimisation fuses into
    # DynamicQuantizeMatMul / MatMulIntegerToFloat) or static QLinear ops
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"} or any(
        o.startswith("QLinear") for o in ops), ops
    assert graph_precision(_graph(folder, "unet"), "fp32") == "int8"
    assert any(t.data_type == TensorProto.INT8 for t in unet.graph.initializer)
    m = read_manifest(folder)
    assert m.graphs["unet"].precision == "int8"
    assert {n: g.precision for n, g in m.graphs.items() if n != "unet"} == dict.fromkeys(
        ["text_encoder", "vae_encoder", "vae_decoder"], "fp32")
    for name in ("text_encoder", "vae_encoder", "vae_decoder"):
        assert not any(t.data_type == TensorProto.INT8 for t in _load(folder, name).graph.initializer), name


def _generate(folder, latents):
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    return pipe("a red cube on a table", height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                latents=latents, output_type="np").images


def test_int8_generation_is_close_to_fp32(int8_export, exports):
    folder, _ = int8_export
    facts = open_model(folder, provider="cpu").facts
    f = facts.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((1, facts.latent_channels, 64 // f, 64 // f)).astype(np.float32)
    ref = _generate(exports("cpu"), latents)
    got = _generate(folder, latents)
    assert ref.shape == got.shape == (1, 64, 64, 3)
    assert np.isfinite(got).all()
    assert ref.std() > 0.05                     # a real image, not a flat one that any graph would match
    diff = np.abs(ref.astype(np.float64) - got)
    psnr = metrics.psnr(ref, got, peak=1.0)
    # images are in [0, 1]; measured on the tiny model: max abs 0.007, PSNR 58 dB (other seeds: 0.013 / 53 dB)
    assert diff.max() < 0.05, diff.max()
    assert psnr > 40, psnr


# -- cpu -------------------------------------------------------------------------------------------------------

def test_cpu_graphs_match_pytorch(tiny_export):
    _, report = tiny_export
    optimised = [c for c in report.checks if c.stage == "optimised"]
    assert {c.component for c in optimised} == set(COMPONENTS)
    for c in optimised:
        assert c.ok and c.finite and c.max_abs < 1e-4, c


def test_cpu_graphs_have_no_gpu_only_ops(exports):
    folder = exports("cpu")
    for name in COMPONENTS:
        assert not _contrib_ops(_load(folder, name)) & GPU_ONLY_OPS, name
    m = read_manifest(folder)
    for name, g in m.graphs.items():
        assert g.provider == "CPUExecutionProvider"
        assert not {op.split(".")[-1] for op in g.custom_ops} & GPU_ONLY_OPS, (name, g.custom_ops)


def test_cpu_sessions_build_on_the_cpu_provider(exports):
    model = open_model(exports("cpu"), provider="cpu")
    for name in COMPONENTS:
        assert model.graph(name).session.get_providers() == ["CPUExecutionProvider"], name


# -- gpu targets -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_graphs_pass_checker_and_shape_inference(exports, target, tmp_path):
    folder, profile = exports(target), load_profile(target)
    for name in COMPONENTS:
        path = _graph(folder, name)
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(tmp_path / f"{name}.onnx"), strict_mode=True)
        assert check_structure(path, profile.component_precision(name) == "fp16") == [], name


def _expected_unet_ops(profile) -> dict:
    """op -> whether the profile's fusion switches put it into the UNet."""
    f = profile.fusions
    on = profile.fusion_enabled
    return {op: bool(on and f.get(key, False) and (key != "use_multi_head_attention" or f.get("enable_attention")))
            for key, op in FUSED_OPS.items()}


def test_expected_fusions_follow_the_profiles():
    """The expectation itself, spelt out for the shipped profiles."""
    cuda, dml, trt = (_expected_unet_ops(load_profile(t)) for t in ("cuda", "directml", "tensorrt"))
    assert all(cuda.values())
    assert dml["GroupNorm"] and not dml["NhwcConv"]
    assert not any(trt.values())


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_unet_has_the_fused_ops_its_profile_asks_for(exports, target):
    folder, profile = exports(target), load_profile(target)
    ops = _contrib_ops(_load(folder, "unet"))
    for op, wanted in _expected_unet_ops(profile).items():
        assert (op in ops) == wanted, (target, op, wanted, sorted(ops))
    if not profile.fusion_enabled:
        for name in COMPONENTS:
            model = _load(folder, name)
            assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, name


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_weights_and_io_precision(exports, target):
    folder, profile = exports(target), load_profile(target)
    m = read_manifest(folder)
    for name in COMPONENTS:
        model = _load(folder, name)
        io = list(model.graph.input) + list(model.graph.output)
        assert all(t.type.tensor_type.elem_type != TensorProto.FLOAT16 for t in io), name
        assert any(t.type.tensor_type.elem_type == TensorProto.FLOAT for t in io), name
        sizes = {TensorProto.FLOAT: 0, TensorProto.FLOAT16: 0}
        for t in model.graph.initializer:
            if t.data_type in sizes:
                sizes[t.data_type] += int(np.prod(t.dims))
        precision = profile.component_precision(name)
        assert m.graphs[name].precision == precision
        if precision == "fp16":
            assert sizes[TensorProto.FLOAT16] > 10 * sizes[TensorProto.FLOAT], (name, sizes)
        else:
            assert sizes[TensorProto.FLOAT16] == 0, (name, sizes)


def test_cuda_keeps_the_vae_in_fp32(exports):
    profile = load_profile("cuda")
    assert set(profile.keep_fp32) == {"vae_encoder", "vae_decoder", "text_encoder_3"}     # and SD3's T5
    folder = exports("cuda")
    for name in ("vae_encoder", "vae_decoder"):
        assert not any(t.data_type == TensorProto.FLOAT16 for t in _load(folder, name).graph.initializer), name
        assert read_manifest(folder).graphs[name].precision == "fp32"
    assert any(t.data_type == TensorProto.FLOAT16 for t in _load(folder, "unet").graph.initializer)


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_manifest_records_provider_and_custom_ops(exports, target):
    folder, profile = exports(target), load_profile(target)
    raw = json.loads((folder / "sdexport.json").read_text())
    assert raw["target"] == target and raw["profile"]["name"] == target
    for name in COMPONENTS:
        g = raw["graphs"][name]
        assert g["provider"] == profile.provider
        assert g["custom_ops"] == custom_ops(_graph(folder, name))
        assert g["custom_ops"] == sorted(f"com.microsoft.{op}" for op in _contrib_ops(_load(folder, name)))
    if profile.fusion_enabled:
        assert raw["graphs"]["unet"]["custom_ops"]


# -- loading on the wrong provider -------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["cuda", "directml"])
def test_wrong_provider_names_the_target(exports, target):
    pipe = StableDiffusionPipeline.from_pretrained(exports(target), provider="cpu")
    with pytest.raises(ModelFolderError) as e:
        pipe("a cat", height=512, width=512, num_inference_steps=1)
    msg = str(e.value)
    assert f"target {target!r}" in msg and load_profile(target).provider in msg, msg
    assert "NOT_IMPLEMENTED" not in msg


def test_wrong_provider_on_the_command_line(exports, tmp_path):
    from runtime.cli import main

    r = CliRunner().invoke(main, ["generate", "--model", str(exports("cuda")), "--prompt", "a cat", "--steps", "1",
                                  "--width", "512", "--height", "512", "--provider", "cpu", "--quiet",
                                  "--out", str(tmp_path / "x.png")], catch_exceptions=False)
    line = one_line_error(r, "'cuda'", "CUDAExecutionProvider", "--target")
    assert "NOT_IMPLEMENTED" not in line
    assert not (tmp_path / "x.png").exists()


def test_unavailable_provider_is_one_line(exports, tmp_path):
    from runtime.cli import main

    r = CliRunner().invoke(main, ["generate", "--model", str(exports("cuda")), "--prompt", "a cat", "--steps", "1",
                                  "--provider", "cuda", "--quiet", "--out", str(tmp_path / "x.png")],
                           catch_exceptions=False)
    one_line_error(r, "CUDAExecutionProvider", "available")


def test_tensorrt_graphs_without_contrib_ops_run_on_cpu(exports):
    model = open_model(exports("tensorrt"), provider="cpu")
    for name in COMPONENTS:
        assert model.graph(name).session.get_providers() == ["CPUExecutionProvider"], name



def test_tensorrt_shape_profiles_reach_each_graphs_session(exports, monkeypatch):
    """Every TensorRT graph carries its own min/opt/max shapes in the manifest, and its session gets them on top of
    the folder's options (engine cache, fp16); CUDA (the fallback) does not get TensorRT's keys."""
    import runtime.session as rs

    folder = exports("tensorrt")
    manifest = read_manifest(folder)
    unet = manifest.graphs["unet"].provider_options
    assert set(unet) == {"trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"}
    assert "encoder_hidden_states:8x231x" in unet["trt_profile_max_shapes"]          # 3 chunks, 4 images x 2
    assert manifest.graphs["text_encoder"].provider_options["trt_profile_max_shapes"] == "input_ids:4x77"
    seen = {}

    def fake_session(path, opts, providers, provider_options, **kw):
        seen[Path(path).parent.name] = dict(zip(providers, provider_options))
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(rs.ort, "InferenceSession", fake_session)
    cfg = rs.SessionConfig(providers=("TensorrtExecutionProvider", "CUDAExecutionProvider"),
                           provider_options={"TensorrtExecutionProvider": {"trt_fp16_enable": True}}, threads=1)
    for name in ("unet", "text_encoder"):
        with pytest.raises(ModelFolderError):
            rs.make_session(folder / name / "model.onnx", cfg, manifest.graphs[name], "tensorrt")
        trt = seen[name]["TensorrtExecutionProvider"]
        assert trt == {"trt_fp16_enable": True} | manifest.graphs[name].provider_options
        assert seen[name]["CUDAExecutionProvider"] == {}
# -- shape ranges --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, batch, height, width, words", [
    ("cuda", 1, 64, 64, ["height 64", "[256, 1024]", "'cuda'"]),
    ("cuda", 1, 512, 2048, ["width 2048", "[256, 1024]"]),
    ("tensorrt", 1, 256, 256, ["height 256", "[512, 768]", "'tensorrt'"]),
    ("directml", 3, 512, 512, ["batch 3", "[1, 2]"]),
])
def test_out_of_range_shapes_are_refused_before_any_graph_runs(exports, target, batch, height, width, words):
    pipe = StableDiffusionPipeline.from_pretrained(exports(target))
    with pytest.raises(ModelFolderError) as e:
        pipe("a cat", height=height, width=width, num_images_per_prompt=batch, num_inference_steps=1)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert pipe.model._graphs == {}


def test_out_of_range_shapes_on_the_command_line(exports, tmp_path):
    from runtime.cli import main

    r = CliRunner().invoke(main, ["generate", "--model", str(exports("tensorrt")), "--prompt", "a cat", "--steps", "1",
                                  "--width", "64", "--height", "64", "--quiet", "--out", str(tmp_path / "x.png")],
                           catch_exceptions=False)
    one_line_error(r, "64", "[512, 768]", "--shapes")
    assert not (tmp_path / "x.png").exists()


def test_fp16_overflow_is_caught_before_conversion(tiny_folder, tmp_path):
    """Activations beyond fp16's range in a component that would run in fp16 fail the convert, naming it."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from sdexport.convert import ConvertConfig, convert

    src = tmp_path / "hot"
    shutil.copytree(tiny_folder, src)
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] = tensors["conv_in.weight"] * 1e5
    save_file(tensors, weights)
    with pytest.raises(UserError, match="unet fp16 range"):
        convert(ConvertConfig(str(src), load_profile("cuda"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_tensorrt_engines_are_cached_per_weight_set(tmp_path):
    """A merged LoRA session must not load the engine TensorRT cached for the plain weights (its cache key is the
    graph path and structure): changed initializers get their own cache folder, the same weights the same one."""
    from runtime.session import engine_cache_options

    trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt_cache"), "trt_fp16_enable": True}
    w = {"unet.w": np.ones((4, 4), np.float32)}
    assert engine_cache_options(trt, None) == trt and engine_cache_options(trt, {}) == trt
    a, b = engine_cache_options(trt, w), engine_cache_options(trt, {"unet.w": np.full((4, 4), 2, np.float32)})
    assert a["trt_engine_cache_path"].startswith(str(tmp_path / "trt_cache" / "weights-"))
    assert a["trt_engine_cache_path"] != b["trt_engine_cache_path"] != trt["trt_engine_cache_path"]
    assert engine_cache_options(trt, {"unet.w": np.ones((4, 4), np.float32)}) == a
    assert {k: v for k, v in a.items() if k != "trt_engine_cache_path"} == {k: v for k, v in trt.items()
                                                                            if k != "trt_engine_cache_path"}
    assert engine_cache_options({"device_id": 0}, w) == {"device_id": 0}          # CUDA: nothing to key
