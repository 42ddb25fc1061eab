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
