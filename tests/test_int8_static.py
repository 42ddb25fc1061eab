"""Static int8 (QDQ Conv + MatMul) UNet: calibrated on pipeline activations, gated by final-image PSNR."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter

import numpy as np
import pytest

from runtime.errors import UserError
from runtime.metrics import psnr

FAST = {"mode": "static", "size": 64, "steps": 2, "calibration_prompts": ["a lighthouse at dusk", "a red fox"]}


def _profile(**int8):
    from sdexport.profiles import load_profile

    p = load_profile("cpu")
    return dataclasses.replace(p, int8=p.int8 | FAST | int8)


def _folder(tiny_export, tmp_path, name):
    """A copy of the tiny cpu export without its manifest, as convert's staging folder is before it writes one."""
    dest = tmp_path / name
    shutil.copytree(tiny_export[0], dest)
    (dest / "sdexport.json").unlink()
    return dest


def _image(folder, prompt="a bowl of ripe lemons on a wooden table"):
    from runtime.model import open_model
    from runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(open_model(folder, provider="cpu", verify=False))
    return pipe(prompt, height=64, width=64, num_inference_steps=2, seed=0, output_type="np").images


def test_static_int8_quantises_conv_and_matmul_within_the_psnr_gate(tiny_export, tmp_path):
    import onnx

    from sdexport.quantize import static_int8

    folder = _folder(tiny_export, tmp_path, "int8")
    installed, check = static_int8(folder, _profile())["unet"]
    assert installed and check.ok and check.psnr_db >= 30.0, check.describe()
    graph = onnx.load(str(folder / "unet" / "model.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    quantized = Counter(n.op_type for n in graph.node if n.op_type in ("Conv", "MatMul")
                        and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "DequantizeLinear")
    assert quantized["Conv"] > 0 and quantized["MatMul"] > 0, quantized
    weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights, "weights should be stored as int8"
    # the shipped graph, run by the runtime on a prompt outside calibration, stays close to the fp32 folder's image
    assert psnr(_image(tiny_export[0]), _image(folder), peak=1.0) >= 30.0


def test_gate_below_threshold_keeps_fp32_unet_and_says_why(tiny_export, tmp_path):
    from sdexport.quantize import static_int8

    folder = _folder(tiny_export, tmp_path, "refused")
    before = (folder / "unet" / "model.onnx").read_bytes()
    messages = []
    installed, check = static_int8(folder, _profile(min_psnr_db=200.0, calibration_prompts=["a red fox"]),
                                   messages.append)["unet"]
    assert not installed and not check.ran
    assert "refused" in check.not_run and "200.0 dB" in check.not_run and "fp32 unet is kept" in messages[-1]
    assert (folder / "unet" / "model.onnx").read_bytes() == before
    assert not list((folder / "unet").glob("model.int8*")) and not list((folder / "unet").glob("model.typed*"))


def test_static_int8_vae_decoder_is_calibrated_and_gated_on_its_own(tiny_export, tmp_path):
    import onnx

    from sdexport.quantize import static_int8

    folder = _folder(tiny_export, tmp_path, "vae")
    messages = []
    results = static_int8(folder, _profile(graphs=["unet", "vae_decoder"]), messages.append)
    assert set(results) == {"unet", "vae_decoder"}
    installed, check = results["vae_decoder"]
    assert installed and check.ok and check.psnr_db >= 30.0 and check.component == "vae_decoder", check.describe()
    assert any("vae_decoder" in m and "inputs" in m for m in messages)
    graph = onnx.load(str(folder / "vae_decoder" / "model.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 0
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)
    assert not list((folder / "vae_decoder").glob("model.int8*")) and not list(folder.glob("*/model.typed*"))
    assert psnr(_image(tiny_export[0]), _image(folder), peak=1.0) >= 30.0      # both int8, a held-out prompt


def test_int8_table_is_validated():
    from sdexport.profiles import load_profile, profile_from_dict
    from sdexport.quantize import int8_settings

    base = {"name": "x", "description": "", "provider": "CPUExecutionProvider", "opset": 17, "precision": "fp32",
            "shapes": {"batch": [1, 1, 1], "height": [64, 64, 64], "width": [64, 64, 64]}}
    for bad, words in (({"mode": "fast"}, "int8.mode"), ({"min_psnr": 20}, "int8.min_psnr"),
                       ({"steps": "4"}, "int8.steps must be a int"), ({"weight_type": "int4"}, "int8.weight_type"),
                       ({"graphs": ["text_encoder"]}, "int8.graphs must list some of unet, vae_decoder"),
                       ({"graphs": []}, "int8.graphs")):
        with pytest.raises(UserError, match=words):
            profile_from_dict(base | {"int8": bad})
    assert int8_settings(profile_from_dict(base | {"quantize_unet": True})).mode == "dynamic"
    assert int8_settings(profile_from_dict(base | {"int8": {"min_psnr_db": 25}})).min_psnr_db == 25
    assert int8_settings(load_profile("cpu")).mode == "off"               # fp32 stays the exact default


@pytest.mark.slow
def test_convert_with_static_int8_records_gate_in_manifest(tmp_path):
    from runtime.model import open_model
    from sdexport.convert import ConvertConfig, convert

    out = tmp_path / "tiny-int8"
    report = convert(ConvertConfig("tiny", _profile(), out))
    manifest = json.loads((out / "sdexport.json").read_text())
    assert manifest["graphs"]["unet"]["precision"] == "int8"
    gate = [c for c in manifest["verification"]["checks"] if c["stage"].startswith("int8 static")]
    assert gate and gate[0]["psnr_db"] >= 30.0 and report.ok
    open_model(out, provider="cpu", verify=True)                           # file hashes match what was written
    assert np.isfinite(_image(out)).all()
