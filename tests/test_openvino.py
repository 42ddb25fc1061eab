"""The openvino provider: tiny models end to end against onnxruntime, compiled shapes, cache, precision, refusals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from runtime import metrics
from runtime.errors import ModelFolderError, UserError
from runtime.model import open_model
from runtime.pipeline import StableDiffusionPipeline
from runtime.session import OPENVINO, choose_providers

ov = pytest.importorskip("openvino", reason='openvino is not installed (pip install "sdexport[openvino]"; '
                                            "the test extra installs it)")

TOLERANCE = 1e-4       # image max abs vs onnxruntime fp32 at the f32 hint (measured 3.3e-6 on the tiny model)
CALL = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=3, seed=7, output_type="np")


@pytest.fixture(scope="module")
def cpu_copy(tiny_export, tmp_path_factory):
    """A private copy of the cpu export: OpenVINO writes its compiled-model cache into the folder."""
    dest = tmp_path_factory.mktemp("ov") / "tiny-cpu"
    shutil.copytree(tiny_export[0], dest)
    return dest


@pytest.fixture(scope="module")
def ov_export(tmp_path_factory):
    """`sdexport convert --model tiny --target openvino` (plain fp32 graphs)."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    out = tmp_path_factory.mktemp("ov") / "tiny-openvino"
    convert(ConvertConfig("tiny", load_profile("openvino"), out, verify=False))
    return out


@pytest.fixture(scope="module")
def ort_image(cpu_copy):
    return StableDiffusionPipeline.from_pretrained(cpu_copy, provider="cpu")(**CALL).images


def _ov_pipe(folder, **kwargs):
    return StableDiffusionPipeline(open_model(folder, provider="openvino", **kwargs))


def test_openvino_reads_the_cpu_graphs_and_matches_onnxruntime(cpu_copy, ort_image):
    pipe = _ov_pipe(cpu_copy, precision="fp32")
    image = pipe(**CALL).images
    assert pipe.model.graph("unet").session.get_providers() == [OPENVINO]
    assert pipe.model.graph("unet").session.precision == "f32"
    assert metrics.max_abs(ort_image, image) <= TOLERANCE
    assert list((cpu_copy / "ov_cache").glob("*.blob"))           # CACHE_DIR beside the graphs


def test_openvino_target_export(ov_export, ort_image):
    raw = json.loads((ov_export / "sdexport.json").read_text())
    assert raw["target"] == "openvino"
    for name, g in raw["graphs"].items():
        assert g["provider"] == OPENVINO and g["custom_ops"] == [], name     # plain ONNX: OpenVINO fuses itself
    pipe = StableDiffusionPipeline.from_pretrained(ov_export)              # auto picks the openvino runtime
    assert pipe.model.session_config.backend == "openvino"
    image = pipe(**CALL).images                  # OpenVINO's own precision: bf16 on AVX512_BF16/AMX CPUs
    assert metrics.psnr(ort_image, image, peak=1.0) >= 30.0
    exact = _ov_pipe(ov_export, precision="fp32")(**CALL).images
    assert metrics.max_abs(ort_image, exact) <= TOLERANCE                  # same weights, same noise, f32 hint
    on_ort = StableDiffusionPipeline.from_pretrained(ov_export, provider="cpu")(**CALL).images
    assert metrics.max_abs(ort_image, on_ort) <= TOLERANCE                 # the folder also runs on onnxruntime


def test_one_compiled_model_per_shape_least_recently_used_dropped(cpu_copy):
    graph = open_model(cpu_copy, provider="openvino").graph("vae_decoder")
    session = graph.session
    for h, w in ((4, 4), (4, 8), (4, 4), (8, 8)):
        out = graph(latent_sample=np.zeros((1, 4, h, w), np.float32))["sample"]
        assert out.shape == (1, 3, 8 * h, 8 * w)
    assert list(session.compiled) == [((1, 4, 4, 4),), ((1, 4, 8, 8),)]    # capacity 2: (4, 8) went first


def test_cache_goes_to_the_user_cache_when_the_folder_is_read_only(cpu_copy, monkeypatch, tmp_path):
    from runtime import graph_cache, openvino_backend

    monkeypatch.setenv("SDEXPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(graph_cache.os, "access", lambda path, mode: False)
    where = openvino_backend.cache_location(cpu_copy, "ov_cache", "openvino")
    assert where.startswith(str(tmp_path / "openvino" / "tiny-cpu-"))
    assert openvino_backend.cache_location(cpu_copy, "", "openvino") == ""                # cache_dir = "" switches it off


def test_threads_and_precision_reach_openvino(cpu_copy):
    from runtime.openvino_backend import compile_config

    config = compile_config({"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16", "cache_dir": "",
                             "device": "CPU", "compiled_shapes": 3, "NUM_STREAMS": 1}, 2, cpu_copy)
    assert config == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": "1",
                      "INFERENCE_NUM_THREADS": "2"}


def test_bf16_runs_where_the_cpu_has_it_and_warns_where_not(cpu_copy, ort_image):
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    pipe = _ov_pipe(cpu_copy, precision="bf16")
    with pytest.warns(UserWarning, match="no native bf16") if not has_bf16 else _no_warning():
        image = pipe(**CALL).images
    assert pipe.model.graph("unet").session.precision == ("bf16" if has_bf16 else "f32")
    assert metrics.psnr(ort_image, image, peak=1.0) >= 30.0


def test_text_encoders_run_f32_so_a_batch_of_prompts_stays_finite(cpu_copy):
    model = open_model(cpu_copy, provider="openvino", precision="bf16")
    ids = np.full((2, 77), 49407, np.int64)
    ids[:, 0], ids[0, 1:5], ids[1, 1:9] = 49406, 320, 1125          # two prompts of different lengths
    out = model.graph("text_encoder")(input_ids=ids)["last_hidden_state"]
    assert np.isfinite(out).all()
    assert model.graph("text_encoder").session.precision == "f32"
    alone = model.graph("text_encoder")(input_ids=ids[1:])["last_hidden_state"]
    assert np.abs(out[1:] - alone).max() < 1e-5                          # batch rows do not mix


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_precision_is_refused_on_onnxruntime(cpu_copy):
    with pytest.raises(UserError, match="--precision bf16 applies to --provider openvino"):
        open_model(cpu_copy, provider="cpu", precision="bf16")


def test_missing_openvino_says_how_to_install(monkeypatch):
    from runtime import openvino_backend

    monkeypatch.setattr(openvino_backend, "available", lambda: False)
    with pytest.raises(UserError, match=r'pip install "sdexport\[openvino\]"'):
        choose_providers("openvino", "CPUExecutionProvider")
    assert choose_providers("auto", OPENVINO, ("CPUExecutionProvider",)) == ("CPUExecutionProvider",)


def _cuda_like(cpu_copy, tmp_path):
    """The cpu folder with a manifest saying its graphs need CUDA-only contrib ops (as a cuda export records)."""
    folder = tmp_path / "tiny-cuda-like"
    shutil.copytree(cpu_copy, folder, ignore=shutil.ignore_patterns("ov_cache"))
    manifest = json.loads((folder / "sdexport.json").read_text())
    manifest["target"] = "cuda"
    for g in manifest["graphs"].values():
        g["provider"], g["custom_ops"] = "CUDAExecutionProvider", ["com.microsoft.NhwcConv", "com.microsoft.GroupNorm"]
    (folder / "sdexport.json").write_text(json.dumps(manifest))
    return folder


def test_a_gpu_fused_folder_is_refused_naming_its_target(cpu_copy, tmp_path):
    pipe = _ov_pipe(_cuda_like(cpu_copy, tmp_path))
    with pytest.raises(ModelFolderError) as e:
        pipe(**CALL)
    assert "target 'cuda'" in str(e.value) and "CUDAExecutionProvider" in str(e.value) and "OpenVINO" in str(e.value)


def test_wrong_provider_on_the_command_line(cpu_copy, tmp_path):
    from runtime.cli import main

    r = CliRunner().invoke(main, ["generate", "--model", str(_cuda_like(cpu_copy, tmp_path)), "--prompt", "a cat",
                                  "--steps", "1", "--provider", "openvino", "--quiet",
                                  "--out", str(tmp_path / "x.png")],
                           catch_exceptions=False)
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "'cuda'" in r.stderr and "--target openvino" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "x.png").exists()


def test_an_op_openvino_cannot_convert_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from runtime.openvino_backend import OpenVINOSession

    node = helper.make_node("NhwcConv", ["x", "w"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("w", TensorProto.FLOAT, [3, 1, 1, 3], [0.0] * 9)])
    (tmp_path / "unet").mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]),
              str(tmp_path / "unet" / "model.onnx"))
    with pytest.raises(ModelFolderError) as e:
        OpenVINOSession(tmp_path / "unet" / "model.onnx", {"cache_dir": ""}, 0)
    msg = str(e.value)
    assert "\n" not in msg and "unet" in msg and "OpenVINO cannot read" in msg and "NhwcConv" in msg, msg


def test_openvino_on_the_command_line(cpu_copy, ort_image, tmp_path):
    from runtime.cli import main

    r = CliRunner().invoke(main, ["generate", "--model", str(cpu_copy), "--prompt", CALL["prompt"], "--negative-prompt",
                                  CALL["negative_prompt"], "--steps", "3", "--seed", "7", "--provider", "openvino",
                                  "--precision", "fp32", "--quiet", "--out", str(tmp_path / "x.npy")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert metrics.max_abs(ort_image, np.load(tmp_path / "x.npy")) <= TOLERANCE


def test_bench_plans_the_openvino_and_bf16_backends():
    from bench import __main__ as bench_cli

    preset = bench_cli.load_preset("cpu-backends") | {"models": ["tiny"]}
    specs = {(s.backend, s.variant): s for s in bench_cli.plan(preset)}
    assert set(specs) == {("diffusers-torch", "fp32"), ("diffusers-torch-bf16", "bf16"), ("runtime-ort", "fp32"),
                          ("runtime-openvino", "default"), ("runtime-openvino", "fp32")}
    assert specs[("runtime-openvino", "fp32")].provider == "openvino" and not specs[("runtime-openvino", "fp32")].reason
    cpu = bench_cli.environment().cpu                       # model, SIMD flags and whether bf16 is native
    assert "; flags " in cpu and "bf16" in cpu


def test_bf16_rounding_is_torchs():
    torch = pytest.importorskip("torch")
    from runtime.openvino_weights import to_bf16

    values = np.concatenate([np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 10.0 ** k
                             for k in range(-6, 4)] + [np.array([0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8,
                                                                 65504.0, 3.0e38], np.float32)])
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_bf16(values), reference)          # ties to even: 1 + 2^-8 -> 1, 1 + 3*2^-8 -> 1 + 2^-6


def _unet_feeds():
    rng = np.random.default_rng(3)
    return {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.array(500, np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}


@pytest.mark.skipif("BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
                    reason="this CPU has no native bf16, so OpenVINO runs f32 and reads the fp32 graph")
def test_bf16_weights_are_stored_once_and_give_the_same_output(cpu_copy, tmp_path):
    from runtime.openvino_backend import OpenVINOSession

    folder = tmp_path / "m"
    shutil.copytree(cpu_copy, folder, ignore=shutil.ignore_patterns("ov_cache", "ort_cache"))
    path, feeds = folder / "unet" / "model.onnx", _unet_feeds()
    types = {p.name: p.type for p in OpenVINOSession(path, {"cache_dir": ""}, 0).get_inputs()}
    feeds["timestep"] = feeds["timestep"].astype(np.float32 if types["timestep"] == "tensor(float)" else np.int64)
    plain = OpenVINOSession(path, {"cache_dir": ""}, 0)                 # no cache folder: the fp32 graph itself
    assert plain.weights == "f32"
    expected = plain.run(["out_sample"], feeds)[0]
    stored = OpenVINOSession(path, {"cache_dir": "ov_cache"}, 0)
    assert stored.weights == "bf16" and stored.source.suffix == ".xml"
    assert stored.source.parent.parent == folder / "ov_cache" and (stored.source.parent / "done").is_file()
    got = stored.run(["out_sample"], feeds)[0]
    assert stored.precision == "bf16" and np.isfinite(got).all()
    assert np.array_equal(got, expected)                # the plugin rounds f32 weights to bf16 the same way
    again = OpenVINOSession(path, {"cache_dir": "ov_cache"}, 0)
    assert again.source == stored.source and not list((folder / "ov_cache").glob("*.tmp-*"))
    assert np.array_equal(again.run(["out_sample"], feeds)[0], expected)
    assert OpenVINOSession(path, {"cache_dir": "ov_cache", "INFERENCE_PRECISION_HINT": "fp32"}, 0).weights == "f32"
    assert OpenVINOSession(folder / "text_encoder" / "model.onnx", {"cache_dir": "ov_cache"}, 0).weights == "f32"


@pytest.mark.skipif("BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
                    reason="this CPU has no native bf16, so no bf16 weights are stored")
def test_a_damaged_bf16_entry_is_dropped_and_the_fp32_graph_read(cpu_copy, tmp_path):
    from runtime.openvino_backend import OpenVINOSession

    folder = tmp_path / "m"
    shutil.copytree(cpu_copy, folder, ignore=shutil.ignore_patterns("ov_cache", "ort_cache"))
    path = folder / "vae_decoder" / "model.onnx"
    first = OpenVINOSession(path, {"cache_dir": "ov_cache"}, 0)
    first.source.write_text("<net>not an IR")                                 # damaged after it was written
    second = OpenVINOSession(path, {"cache_dir": "ov_cache"}, 0)
    assert second.weights == "f32" and second.source == path and not first.source.parent.exists()
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.isfinite(second.run([second.get_outputs()[0].name], {"latent_sample": latents})[0]).all()
    assert OpenVINOSession(path, {"cache_dir": "ov_cache"}, 0).weights == "bf16"     # rebuilt by the next one
