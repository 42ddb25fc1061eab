"""LoRA at run time: parity with diffusers' load_lora_weights + fuse_lora on the tiny models, formats, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

from runtime.errors import UserError
from runtime.pipeline import StableDiffusionPipeline

SIZE, STEPS, PROMPT = 64, 4, "a castle on a hill"


def _pair(rng, weight: torch.Tensor, rank: int, gain: float):
    """Random (down, up) for one layer: big enough to move the image visibly."""
    if weight.dim() == 2:
        return (rng.standard_normal((rank, weight.shape[1])) * gain, rng.standard_normal((weight.shape[0], rank)) * gain)
    return (rng.standard_normal((rank, *weight.shape[1:])) * gain / 3,
            rng.standard_normal((weight.shape[0], rank, 1, 1)) * gain / 3)


def _targets(module, text: bool):
    """(name, module) LoRA trains: attention/MLP linears, and (UNet) 1x1 projections and a 3x3 conv (LoCon)."""
    for name, m in module.named_modules():
        if text and isinstance(m, torch.nn.Linear) and ("self_attn" in name or "mlp" in name):
            yield name, m
        elif not text and (isinstance(m, torch.nn.Linear) and ("attn" in name or ".ff." in name)
                           or name.endswith(("proj_in", "proj_out", "resnets.0.conv1"))):
            yield name, m


def kohya_file(path, pipe, seed=0, rank=4, alpha=2.0, gain=0.3, te_prefixes=(("text_encoder", "lora_te_"),)):
    """A kohya-format LoRA for every target layer of the pipeline's UNet and text encoders."""
    rng, out = np.random.default_rng(seed), {}
    parts = [("unet", "lora_unet_", False)] + [(c, p, True) for c, p in te_prefixes]
    for component, prefix, text in parts:
        for name, m in _targets(getattr(pipe, component), text):
            key = prefix + ("text_model." + name if text else name).replace(".", "_")
            down, up = _pair(rng, m.weight, rank, gain)
            out |= {f"{key}.lora_down.weight": down.astype(np.float16), f"{key}.lora_up.weight": up.astype(np.float16),
                    f"{key}.alpha": np.array(alpha, np.float16)}
    save_file(out, str(path))
    return path


def peft_file(path, pipe, seed=5, rank=4, alpha=8.0, gain=0.2):
    """A diffusers/PEFT-format LoRA (`unet.` / `text_encoder.` prefixes, lora_alpha in the adapter metadata)."""
    rng, out, meta = np.random.default_rng(seed), {}, {}
    for component, text in (("unet", False), ("text_encoder", True)):
        modules = [(n, m) for n, m in _targets(getattr(pipe, component), text) if m.weight.dim() == 2]
        for name, m in modules:
            key = f"{component}.{'text_model.' if text else ''}{name}"
            down, up = _pair(rng, m.weight, rank, gain)
            out |= {f"{key}.lora_A.weight": down.astype(np.float32), f"{key}.lora_B.weight": up.astype(np.float32)}
        meta |= {f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                 f"{component}.target_modules": sorted(n for n, _ in modules)}
    save_file(out, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def reference(folder, loras: dict, cls="StableDiffusionPipeline"):
    """diffusers with `loras` {file: weight} loaded and fused."""
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    names = [f"l{i}" for i in range(len(loras))]
    for name, path in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if loras:
        pipe.set_adapters(names, list(loras.values()))
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    return pipe


def run_both(ours, ref, latents, **kw):
    """(ours, diffusers) float images for the same latents."""
    a = ours(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents.numpy(), output_type="np",
             **kw).images
    with torch.no_grad():
        b = ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents, output_type="np").images
    return a, b


@pytest.fixture(scope="module")
def ours(tiny_export):
    return StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")


@pytest.fixture(scope="module")
def plain(tiny_folder):
    import diffusers

    return diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None,
                                                             requires_safety_checker=False)


@pytest.fixture(scope="module")
def files(plain, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {"kohya": kohya_file(d / "style.safetensors", plain), "kohya2": kohya_file(d / "other.safetensors", plain,
                                                                                      seed=3, rank=2, alpha=1.0),
            "peft": peft_file(d / "peft.safetensors", plain)}


@pytest.fixture(scope="module")
def latents():
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("scale", [0.6, 1.0])
def test_kohya_unet_and_text_encoder_lora_matches_diffusers(ours, tiny_folder, files, latents, scale):
    base, _ = run_both(ours, reference(tiny_folder, {}), latents)
    a, b = run_both(ours, reference(tiny_folder, {files["kohya"]: scale}), latents, loras={files["kohya"]: scale})
    assert np.abs(a - base).max() > 0.05                       # the LoRA visibly moves the image
    assert np.abs(a - b).max() <= 1e-3


def test_peft_format_lora_matches_diffusers(ours, tiny_folder, files, latents):
    a, b = run_both(ours, reference(tiny_folder, {files["peft"]: 0.8}), latents, loras={files["peft"]: 0.8})
    assert np.abs(a - b).max() <= 1e-3


def test_two_loras_at_once_match_diffusers(ours, tiny_folder, files, latents):
    both = {files["kohya"]: 0.7, files["kohya2"]: 0.5}
    a, b = run_both(ours, reference(tiny_folder, both), latents, loras=both)
    assert np.abs(a - b).max() <= 1e-3


def test_prompt_tag_equals_lora_option_and_is_stripped(ours, files, latents):
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, latents=latents.numpy(), output_type="np")
    ours.lora_dir = files["kohya"].parent
    try:
        tagged = ours(PROMPT + " <lora:style:0.6>", **kw).images
        tagged_a1111 = ours(PROMPT + " <lora:style:0.6>", prompt_syntax="a1111", **kw).images
    finally:
        ours.lora_dir = None
    given = ours(PROMPT, loras={files["kohya"]: 0.6}, **kw).images
    assert np.array_equal(tagged, given) and np.abs(tagged_a1111 - given).max() < 1e-5


def test_load_lora_applies_to_later_calls_and_sets_are_cached(ours, files, latents):
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2, latents=latents.numpy(), output_type="np")
    ours.load_lora(files["kohya"], 0.6)
    try:
        loaded = ours(PROMPT, **kw).images
    finally:
        ours.unload_lora()
    assert np.array_equal(loaded, ours(PROMPT, loras={files["kohya"]: 0.6}, **kw).images)
    cache = ours.lora_cache
    first = cache.model_for(((files["kohya"], 0.6),))
    assert cache.model_for(((files["kohya"], 0.6),)) is first                  # a cached switch: no rebuild
    cache.max_sets = 1
    cache.model_for(((files["kohya2"], 0.6),))
    assert cache.model_for(((files["kohya"], 0.6),)) is not first              # evicted (LRU, bounded)


@pytest.mark.slow
def test_sdxl_lora_matches_diffusers(tmp_path):
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile
    from sdexport.tiny import tiny_folder

    folder = tiny_folder("tiny-sdxl")
    convert(ConvertConfig("tiny-sdxl", load_profile("cpu"), tmp_path / "xl", verify=False))
    ref0 = reference(folder, {}, "StableDiffusionXLPipeline")
    lora = kohya_file(tmp_path / "xl.safetensors", ref0, te_prefixes=(("text_encoder", "lora_te1_"),
                                                                      ("text_encoder_2", "lora_te2_")))
    ours = StableDiffusionPipeline.from_pretrained(tmp_path / "xl", provider="cpu")
    lat = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(3))
    a, b = run_both(ours, reference(folder, {lora: 0.8}, "StableDiffusionXLPipeline"), lat, loras={lora: 0.8})
    assert np.abs(a - b).max() <= 1e-3


# -- errors ---------------------------------------------------------------------------------------------------
def _write(path, tensors: dict):
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


def test_lora_for_another_architecture_names_layer_and_shapes(ours, tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    f = _write(tmp_path / "xl.safetensors", {f"{key}.lora_down.weight": np.ones((4, 640)),
                                              f"{key}.lora_up.weight": np.ones((640, 4))})
    with pytest.raises(UserError, match=r"to_q is \[640, 640\] but unet .*attn1.to_q is \[32, 32\]"):
        ours("x", num_inference_steps=1, loras={f: 1.0})


def test_unknown_keys_are_named_and_partial_files_need_the_switch(ours, tmp_path):
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    f = _write(tmp_path / "p.safetensors", {
        f"{good}.lora_down.weight": np.ones((2, 32)) * 0.01, f"{good}.lora_up.weight": np.ones((32, 2)),
        "lora_unet_no_such_layer.lora_down.weight": np.ones((2, 32)), "lora_unet_no_such_layer.lora_up.weight":
            np.ones((32, 2))})
    with pytest.raises(UserError, match="1 of 2 layers match no layer of this model: lora_unet_no_such_layer.*"
                                        "--lora-partial"):
        ours.lora_cache.model_for(((f, 1.0),))
    assert "unet" in ours.lora_cache.model_for(((f, 1.0),), partial=True).overlay


@pytest.mark.parametrize("loras, message", [
    ({"a.safetensors": "strong"}, "weight must be a finite number"),
    ({"a.safetensors": float("nan")}, "weight must be a finite number"),
    ((("a.safetensors",),), "each entry must be"),
])
def test_bad_lora_weights_are_refused(loras, message):
    from runtime.request import GenerationRequest

    with pytest.raises(UserError, match=message):
        GenerationRequest.create("x", loras=loras)


def test_missing_file_in_lora_dir_and_pickles_are_refused(ours, files, tmp_path):
    ours.lora_dir = files["kohya"].parent
    try:
        with pytest.raises(UserError, match="no LoRA named 'nothere' in .*it has: .*style"):
            ours("x <lora:nothere:1>", num_inference_steps=1)
    finally:
        ours.lora_dir = None
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="pickled checkpoints .* are refused"):
        ours("x", num_inference_steps=1, loras={tmp_path / "evil.ckpt": 1.0})


def test_cli_lora_options_and_listing(tiny_export, files, tmp_path):
    from runtime.cli import main

    runner = CliRunner()
    listing = runner.invoke(main, ["loras", str(files["kohya"].parent)])
    assert listing.exit_code == 0, listing.output
    assert "style" in listing.output and "kohya" in listing.output and "text_encoder, unet" in listing.output
    bad = runner.invoke(main, ["generate", "--model", str(tiny_export[0]), "--prompt", "x", "--out",
                               str(tmp_path / "o.png"), "--lora", f"{files['kohya']}:lots"])
    assert bad.exit_code != 0 and "must be a number, got 'lots'" in bad.output
    ok = runner.invoke(main, ["generate", "--model", str(tiny_export[0]), "--prompt", "x <lora:other:0.5>",
                              "--steps", "1", "--width", "64", "--height", "64", "--quiet", "--out",
                              str(tmp_path / "o.npy"), "--lora", f"{files['kohya']}:0.4",
                              "--lora-dir", str(files["kohya"].parent)])
    assert ok.exit_code == 0, ok.output


def test_list_loras_has_the_sdapi_fields(files):
    from runtime.lora import list_loras

    items = {i["name"]: i for i in list_loras(files["kohya"].parent)}
    assert {"name", "alias", "path", "metadata"} <= set(items["style"])
    assert items["style"]["rank"] == 4 and items["other"]["rank"] == 2 and items["peft"]["format"] == "peft"


# -- pieces ---------------------------------------------------------------------------------------------------
def test_onnx_reader_matches_onnx_for_external_and_fp16_data(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    from runtime.lora.onnx_weights import OnnxWeights

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    h = np.linspace(-2, 2, 6).astype(np.float16).reshape(2, 3)
    inits = [numpy_helper.from_array(a, "a"),
             helper.make_tensor("h", onnx.TensorProto.FLOAT16, [2, 3], h.ravel().tolist(), raw=False)]  # int32_data
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 4])], inits)
    onnx.save_model(helper.make_model(graph), str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.onnx_data", size_threshold=24)   # a external, h inline
    w = OnnxWeights(tmp_path / "m.onnx")
    assert np.array_equal(w.read("a"), a) and np.array_equal(w.read("h"), h) and w.tensors["a"].file.name == "m.onnx_data"


def test_sgm_block_names_map_to_diffusers():
    from runtime.lora.keys import sgm_to_diffusers

    assert sgm_to_diffusers("input_blocks_4_1_transformer_blocks_0_attn1_to_q", 2) == \
        "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sgm_to_diffusers("output_blocks_2_1_conv", 2) == "up_blocks_0_upsamplers_0_conv"
    assert sgm_to_diffusers("middle_block_2_in_layers_2", 2) == "mid_block_resnets_1_conv1"
    assert sgm_to_diffusers("input_blocks_3_0_op", 2) == "down_blocks_0_downsamplers_0_conv"


def test_lora_generation_runs_without_torch(tiny_export, files, tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_runtime_cli import BLOCK_TORCH, ROOT, base_args

    out = tmp_path / "img.png"
    cmd = [sys.executable, "-c", BLOCK_TORCH, *base_args(str(tiny_export[0]), str(out)), "--lora",
           f"{files['kohya']}:0.7", "--lora-dir", str(files["kohya"].parent)]
    cmd[cmd.index("a cat")] = "a cat <lora:other:0.5>"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    listing = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "loras", str(files["kohya"].parent)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert listing.returncode == 0 and "peft" in listing.stdout, listing.stderr


def test_served_prompt_tags_use_the_lora_dir_and_it_is_listed(tiny_export, ours, files):
    """`runtime serve --lora-dir`: /sdapi/v1/loras lists the files; a <lora:...> tag changes the image exactly as
    the Python API's loras= does (A1111 syntax, same seed)."""
    from serve_util import Served, decode_png

    from runtime.serve.settings import ServeSettings

    served = Served(ServeSettings(tiny_export[0], lora_dir=files["kohya"].parent))
    try:
        listed = served.get("/sdapi/v1/loras").body
        assert {"style", "other", "peft"} <= {item["name"] for item in listed}
        body = {"prompt": PROMPT + " <lora:style:0.6>", "steps": 2, "width": SIZE, "height": SIZE, "seed": 3,
                "sampler_name": "Euler", "cfg_scale": 7.0}
        reply = served.post("/sdapi/v1/txt2img", body)
        assert reply.status == 200, reply.body
        served_pixels, _ = decode_png(reply.body["images"][0])
    finally:
        served.stop()
    want = ours(PROMPT, loras={files["kohya"]: 0.6}, height=SIZE, width=SIZE, num_inference_steps=2, seed=3,
                scheduler="Euler", guidance_scale=7.0, prompt_syntax="a1111").images[0]
    assert np.array_equal(served_pixels, np.asarray(want))


def _source_layout(entry: dict, array: np.ndarray) -> np.ndarray:
    """A graph initializer's values in its source weight's layout (q/k/v columns unpacked, MatMul transposed)."""
    x = array.astype(np.float32)
    if "columns" in entry:
        x = np.concatenate([x[:, a:b] for a, b in entry["columns"]], axis=1)
    if "permute" in entry:                                                  # NhwcConv (out, kh, kw, in)
        return x.transpose(np.argsort(entry["permute"]))
    return (x.T if entry["transpose"] else x).reshape(entry["shape"])


def test_fp16_gpu_folders_take_the_same_update_as_fp32(tiny_export, tiny_targets, files):
    """A cuda folder (fp16 weights, fused attention with packed q/k/v) gets the same LoRA update per source weight
    as the cpu folder's fp32 graphs, within fp16 rounding; its merged initializers stay fp16. (Its sessions need
    CUDA kernels, so this compares the merged weights rather than images.)"""
    from runtime.lora.apply import COMPONENTS, LoraCache, _layers_per_block
    from runtime.lora.formats import load_lora
    from runtime.lora.keys import resolve
    from runtime.lora.merge import merged_initializers
    from runtime.model import open_model

    found, dtypes = {}, {}
    for target, folder in (("cpu", tiny_export[0]), ("cuda", tiny_targets("cuda"))):
        maps = {c: g for c, g in LoraCache(open_model(folder, provider="cpu")).graph_weights().items()
                if c in COMPONENTS}
        targets = resolve(load_lora(files["kohya"]), {c: g.names for c, g in maps.items()},
                          {c: g.shapes for c, g in maps.items()}, _layers_per_block(folder))
        for component, weights in maps.items():
            merged = merged_initializers(weights, [(t, 0.8) for t in targets if t.component == component])
            for name, entry in weights.weights.items():
                if entry["initializer"] in merged:
                    new = merged[entry["initializer"]]
                    dtypes.setdefault(target, set()).add(new.dtype)
                    old = _source_layout(entry, weights.read(entry["initializer"]))
                    found.setdefault(target, {})[component, name] = (_source_layout(entry, new) - old, old)
    cpu, cuda = found["cpu"], found["cuda"]
    assert set(cuda) == set(cpu) and len(cpu) > 20
    assert dtypes["cpu"] == {np.dtype(np.float32)} and np.dtype(np.float16) in dtypes["cuda"]
    for key, (delta, base) in cpu.items():
        gpu_delta = cuda[key][0]
        assert np.abs(delta).max() > 1e-3, key                                         # the LoRA moved it
        assert np.abs(gpu_delta - delta).max() <= 2e-3 * (np.abs(base).max() + np.abs(delta).max()), key
