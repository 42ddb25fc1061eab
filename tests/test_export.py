"""Exporter: tiny end to end, parity with PyTorch, dynamic axes, manifest."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtime.manifest import check_files, read_manifest
from sdexport.specs import UNET, dims
from sdexport.verify import compare

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")   # an SD 1.x export


def test_folder_layout(tiny_export):
    out, _ = tiny_export
    for rel in ("model_index.json", "sdexport.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "scheduler/scheduler_config.json"):
        assert (out / rel).is_file(), rel
    for name in COMPONENTS:
        assert (out / name / "model.onnx").is_file()
        assert (out / name / "config.json").is_file()
        onnx.checker.check_model(str(out / name / "model.onnx"))
    assert json.loads((out / "vae_decoder" / "config.json").read_text())["scaling_factor"] == 0.18215
    assert not list(out.parent.glob(".tiny-cpu.*")), "staging folders left behind"


def test_every_graph_matches_pytorch(tiny_export):
    _, report = tiny_export
    assert {c.component for c in report.checks} == set(COMPONENTS)
    for c in report.checks:
        assert c.finite and c.max_abs < 1e-4, c


def test_manifest_validates_and_hashes_match(tiny_export):
    out, _ = tiny_export
    m = read_manifest(out)
    assert m.target == "cpu" and m.precision == "fp32"
    assert set(m.graphs) == set(COMPONENTS)
    assert m.source["kind"] == "tiny"
    assert m.tool_versions["torch"] and m.tool_versions["onnxruntime"]
    unet = m.graphs["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[0].shape == ("batch", 4, "latent_height", "latent_width")
    assert unet.inputs[1].shape == () and unet.inputs[1].dtype == "float32"
    assert m.graphs["text_encoder"].inputs[0].dtype == "int64"
    assert [t.name for t in m.graphs["vae_encoder"].outputs] == ["latent_parameters"]
    assert "unet/model.onnx" in m.files
    check_files(out, m, hashes=True)


@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (3, 192, 128), (2, 320, 256)])
def test_unet_dynamic_axes(tiny_export, tiny_components, batch, height, width):
    out, _ = tiny_export
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    check = compare(UNET, tiny_components.modules["unet"], session, dims(tiny_components.configs, batch, height, width, 77))
    assert check.max_abs < 1e-4, check


def test_graph_declares_named_dynamic_axes(tiny_export):
    out, _ = tiny_export
    model = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    sample = next(i for i in model.graph.input if i.name == "sample")
    dims_ = [d.dim_param or d.dim_value for d in sample.type.tensor_type.shape.dim]
    assert dims_ == ["batch", 4, "latent_height", "latent_width"]


def test_vae_encoder_outputs_distribution_parameters(tiny_export, tiny_components):
    import torch

    out, _ = tiny_export
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(out / "vae_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    (params,) = session.run(None, {"sample": x})
    with torch.no_grad():
        dist = tiny_components.modules["vae"].encode(torch.from_numpy(x)).latent_dist
    mean, logvar = np.split(params, 2, axis=1)
    np.testing.assert_allclose(mean, dist.mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.clip(logvar, -30, 20), dist.logvar.numpy(), atol=1e-5)


def test_scattered_external_data_is_gathered_into_one_file(tmp_path):
    """Graphs over 2 GB come out of the tracer with one file per tensor; we ship one model.onnx_data."""
    from onnx import TensorProto, helper, numpy_helper

    from sdexport.onnx_io import DATA_FILE, gather_external_data

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 64), dtype=np.float32), rng.standard_normal((64, 8), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    src = tmp_path / "traced" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(helper.make_model(graph), str(src), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(src.parent.iterdir())) == 3
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    gather_external_data(src, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", DATA_FILE]
    x = rng.standard_normal((1, 64), dtype=np.float32)
    (y,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w1 @ w2, rtol=1e-5, atol=1e-5)
