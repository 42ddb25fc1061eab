"""Single-file checkpoints: the tiny model saved in the original CompVis layout converts back exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ldm_layout import folder_to_ldm, read_folder, write_checkpoint
from runtime.errors import UserError
from sdexport import tiny
from sdexport.single_file import to_diffusers_folder

COMPONENTS = ("unet", "vae", "text_encoder")
SD2_YAML = """model:
  params:
    parameterization: "v"
    unet_config:
      params:
        image_size: 32
        num_head_channels: 8
        use_linear_in_transformer: true
"""
XL_YAML = "model:\n  params:\n    network_config:\n      params:\n        num_head_channels: 8\n"
FEED_SIZES = {"batch": 1, "sequence": 77, "latent_height": 8, "latent_width": 8, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def sd1_file(tiny_folder, tmp_path_factory) -> Path:
    """The tiny model as an SD 1.x .safetensors single file."""
    return write_checkpoint(folder_to_ldm(tiny_folder, "sd1"), tmp_path_factory.mktemp("sf") / "tiny.safetensors")


@pytest.fixture(scope="module")
def sd1_converted(sd1_file, tmp_path_factory) -> Path:
    """The SD 1.x single file converted back to a diffusers folder."""
    return to_diffusers_folder(sd1_file, tmp_path_factory.mktemp("sfcache"))


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory) -> Path:
    """A tiny SD 2.x-style folder: linear transformer projections, 8-wide heads, GELU text encoder."""
    dest = tmp_path_factory.mktemp("sd2") / "tiny-sd2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "UNET_CONFIG", {**tiny.UNET_CONFIG, "use_linear_projection": True,
                                         "attention_head_dim": (4, 8), "upcast_attention": True})
        mp.setattr(tiny, "TEXT_CONFIG", {**tiny.TEXT_CONFIG, "hidden_act": "gelu"})
        dest.mkdir()
        tiny.build_tiny(dest)
    return dest


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    """A tiny SDXL-style folder: text_time added conditioning, two text encoders, 2 transformer layers deep."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dest = tmp_path_factory.mktemp("sdxl") / "tiny-xl"
    torch.manual_seed(0)
    UNet2DConditionModel(**{
        **tiny.UNET_CONFIG, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 64, "attention_head_dim": (4, 8),
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8, "transformer_layers_per_block": (1, 2),
    }).save_pretrained(dest / "unet")
    AutoencoderKL(**{**tiny.VAE_CONFIG, "scaling_factor": 0.13025}).save_pretrained(dest / "vae")
    CLIPTextModel(CLIPTextConfig(**tiny.TEXT_CONFIG)).save_pretrained(dest / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(**{**tiny.TEXT_CONFIG, "hidden_act": "gelu"})).save_pretrained(
        dest / "text_encoder_2")
    return dest


def assert_same_weights(original: Path, converted: Path, names=COMPONENTS) -> None:
    """Every tensor of every component is bit-identical, with no key missing or added."""
    for name in names:
        a, _ = read_folder(original, name)
        b, _ = read_folder(converted, name)
        norm = lambda d: {k.removeprefix("text_model."): v for k, v in d.items()}  # noqa: E731
        a, b = norm(a), norm(b)
        assert a.keys() == b.keys(), (name, sorted(a.keys() ^ b.keys())[:5])
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (name, k)


def assert_same_sizes(original: Path, converted: Path) -> None:
    """The configs agree on everything the weights determine."""
    keys = {"unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                     "up_block_types", "cross_attention_dim", "attention_head_dim", "use_linear_projection"),
            "vae": ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"),
            "text_encoder": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                             "vocab_size", "max_position_embeddings")}
    for name, fields in keys.items():
        _, a = read_folder(original, name)
        _, b = read_folder(converted, name)
        assert {f: _listed(a.get(f)) for f in fields} == {f: _listed(b.get(f)) for f in fields}, name


def _listed(value):
    """Tuples and lists compare equal."""
    return list(value) if isinstance(value, (list, tuple)) else value


def test_sd1_safetensors_round_trips(tiny_folder, sd1_converted):
    assert_same_weights(tiny_folder, sd1_converted)
    assert_same_sizes(tiny_folder, sd1_converted)
    assert json.loads((sd1_converted / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "epsilon"
    assert json.loads((sd1_converted / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == \
        "<|endoftext|>"


def test_sd1_ckpt_round_trips(tiny_folder, tmp_path):
    ckpt = write_checkpoint(folder_to_ldm(tiny_folder, "sd1"), tmp_path / "tiny.ckpt")
    assert_same_weights(tiny_folder, to_diffusers_folder(ckpt, tmp_path / "cache"))


def test_sd2_with_sidecar_yaml_round_trips(sd2_folder, tmp_path):
    path = write_checkpoint(folder_to_ldm(sd2_folder, "sd2"), tmp_path / "tiny-v.safetensors")
    path.with_suffix(".yaml").write_text(SD2_YAML)
    out = to_diffusers_folder(path, tmp_path / "cache")
    assert_same_weights(sd2_folder, out)
    assert_same_sizes(sd2_folder, out)
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 32
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    assert json.loads((out / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"


def test_sdxl_base_round_trips(sdxl_folder, tmp_path):
    path = write_checkpoint(folder_to_ldm(sdxl_folder, "sdxl_base"), tmp_path / "tiny-xl.safetensors")
    path.with_suffix(".yaml").write_text(XL_YAML)
    out = to_diffusers_folder(path, tmp_path / "cache")
    assert_same_weights(sdxl_folder, out, COMPONENTS + ("text_encoder_2",))
    assert_same_sizes(sdxl_folder, out)
    _, a = read_folder(sdxl_folder, "unet")
    _, b = read_folder(out, "unet")
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block"):
        assert _listed(a[key]) == _listed(b[key]), key
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((out / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"


def test_cache_is_reused_and_keyed_by_hints(sd1_file, sd1_converted):
    cache = sd1_converted.parent
    assert to_diffusers_folder(sd1_file, cache) == sd1_converted
    v = to_diffusers_folder(sd1_file, cache, prediction_type="v")
    assert v != sd1_converted
    assert json.loads((v / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert not list(cache.glob(".*tmp-*")), "staging folders left behind"


def _feed(session: ort.InferenceSession) -> dict:
    """Seeded inputs for every graph input, symbolic axes at small fixed sizes."""
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = [FEED_SIZES.get(d, d) if isinstance(d, str) else d for d in i.shape]
        feed[i.name] = (rng.integers(0, 1000, shape).astype(np.int64) if "int64" in i.type
                        else rng.standard_normal(shape).astype(np.float32))
    return feed


def test_export_matches_folder_export(sd1_file, tiny_export, tmp_path):
    """`sdexport convert --model tiny.safetensors` gives the same graphs as the diffusers-folder export."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    reference, _ = tiny_export
    out = tmp_path / "from-single-file"
    convert(ConvertConfig(str(sd1_file), load_profile("cpu"), out, verify=False))  # compared below instead
    assert json.loads((out / "sdexport.json").read_text())["source"]["kind"] == "single_file"
    for name in ("unet", "vae_decoder", "text_encoder"):
        a = ort.InferenceSession(str(reference / name / "model.onnx"), providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(out / name / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = _feed(a)
        for x, y in zip(a.run(None, feed), b.run(None, feed)):
            assert np.abs(x - y).max() < 1e-5, (name, float(np.abs(x - y).max()))


def _one_line_error(path: Path, cache: Path, *words: str) -> str:
    """Convert and return the UserError text, checking it is one line naming the file."""
    with pytest.raises(UserError) as e:
        to_diffusers_folder(path, cache)
    message = str(e.value)
    assert "\n" not in message and str(path.name) in message
    for w in words:
        assert w in message, message
    return message


def test_truncated_safetensors_is_a_one_line_error(sd1_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = sd1_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(cut, tmp_path / "cache", "truncated")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_unknown_layout_is_a_one_line_error(tmp_path):
    path = write_checkpoint({"encoder.layer.0.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    _one_line_error(path, tmp_path / "cache", "unknown checkpoint layout")


def test_missing_keys_is_a_one_line_error(tiny_folder, tmp_path):
    sd = folder_to_ldm(tiny_folder, "sd1")
    del sd["first_stage_model.decoder.conv_out.weight"]
    path = write_checkpoint(sd, tmp_path / "partial.ckpt")
    _one_line_error(path, tmp_path / "cache", "missing", "decoder.conv_out.weight")
    sd = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    _one_line_error(write_checkpoint(sd, tmp_path / "novae.safetensors"), tmp_path / "cache", "no VAE weights")
