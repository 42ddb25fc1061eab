"""Textual-inversion embeddings at run time: parity with diffusers' load_textual_inversion on the tiny model, A1111
matching, LoRA together, the plain graph when unused, listings and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

from runtime.embeddings import embedding_view, list_embeddings, use_folder
from runtime.errors import UserError
from runtime.pipeline import StableDiffusionPipeline
from runtime.request import GenerationRequest

SIZE, STEPS, WIDTH = 64, 4, 32                  # the tiny text encoder's hidden size
LAYOUTS = {"a1111": lambda v: {"emb_params": v}, "a1111_pt_keys": lambda v: {"string_to_param.*": v},
           "diffusers": lambda v: {"<concept>": v}}


def write(path, vectors, layout="a1111"):
    """An embedding file in one of the layouts."""
    save_file(LAYOUTS[layout](np.asarray(vectors, np.float32)), str(path))
    return path


def vectors(seed: int, count: int, width: int = WIDTH):
    """Random vectors big enough to move the image visibly."""
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32) * 2.0


def diffusers_pipe(folder, embeddings=(), loras=None):
    """diffusers on the same tiny model with `embeddings` [(path, token)] loaded (and LoRA files fused)."""
    if loras:
        from test_lora import reference
        pipe = reference(folder, loras)
    else:
        import diffusers
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for path, token in embeddings:
        pipe.load_textual_inversion(str(path), token=token)
    return pipe


def run(pipe, prompt, latents, **kw):
    """Float images of one of our pipelines or diffusers' for the same latents."""
    if isinstance(pipe, StableDiffusionPipeline):
        return pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents.numpy(),
                    output_type="np", **kw).images
    with torch.no_grad():
        return pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=latents,
                    output_type="np", **kw).images


@pytest.fixture(scope="module")
def ours(tiny_export):
    return StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")


@pytest.fixture(scope="module")
def latents():
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    write(d / "mystyle.safetensors", vectors(0, 3))
    write(d / "glowy.safetensors", vectors(1, 1), "a1111_pt_keys")
    write(d / "sd2thing.safetensors", vectors(2, 2, 1024))
    return d


@pytest.fixture
def pipe(ours, folder):
    ours.embeddings_dir = folder
    yield ours
    ours.embeddings_dir = None
    ours.unload_textual_inversion()


@pytest.mark.parametrize("layout,count", [("a1111", 3), ("a1111_pt_keys", 1), ("diffusers", 2)])
def test_embedding_layouts_match_diffusers(ours, tiny_folder, latents, tmp_path, layout, count):
    path = write(tmp_path / "newthing.safetensors", vectors(5, count), layout)
    prompt = "a newthing castle on a hill"
    base = run(ours, prompt, latents)
    ours.embeddings_dir = tmp_path
    try:
        a = run(ours, prompt, latents)
    finally:
        ours.embeddings_dir = None
    b = run(diffusers_pipe(tiny_folder, [(path, "newthing")]), prompt, latents)
    assert np.abs(a - base).max() > 0.05                       # the embedding visibly moves the image
    assert np.abs(a - b).max() <= 1e-3


def test_two_embeddings_with_negative_prompt_match_diffusers(pipe, tiny_folder, folder, latents):
    kw = {"negative_prompt": "glowy, blurry"}
    a = run(pipe, "mystyle portrait, glowy lights, mystyle", latents, **kw)
    ref = diffusers_pipe(tiny_folder, [(folder / "glowy.safetensors", "glowy"),
                                       (folder / "mystyle.safetensors", "mystyle")])
    b = run(ref, "mystyle portrait, glowy lights, mystyle", latents, **kw)
    assert np.abs(a - b).max() <= 1e-3


def test_loaded_embedding_with_lora_matches_diffusers(ours, tiny_folder, folder, latents, tmp_path):
    import diffusers
    from safetensors.numpy import load_file
    from test_lora import kohya_file

    kohya_file(tmp_path / "full.safetensors", diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_folder, safety_checker=None, requires_safety_checker=False), gain=0.6)
    lora = tmp_path / "te.safetensors"                         # its text-encoder layers: the ones embeddings meet
    save_file({k: v for k, v in load_file(str(tmp_path / "full.safetensors")).items() if k.startswith("lora_te_")},
              str(lora))
    ours.load_textual_inversion(folder / "mystyle.safetensors")
    try:
        a = run(ours, "a mystyle castle", latents, loras={lora: 0.8})
        plain_lora = run(ours, "a castle", latents, loras={lora: 0.8})
        no_lora = run(ours, "a mystyle castle", latents)
    finally:
        ours.unload_textual_inversion()
    b = run(diffusers_pipe(tiny_folder, [(folder / "mystyle.safetensors", "mystyle")], {lora: 0.8}),
            "a mystyle castle", latents)
    assert np.abs(a - b).max() <= 1e-3
    assert np.abs(a - plain_lora).max() > 0.05 and np.abs(a - no_lora).max() > 0.05


def test_prompt_without_embedding_runs_the_plain_graph_and_tokens(pipe, tiny_export, latents):
    request = GenerationRequest.create("a castle on a hill", negative_prompt="mystyles? no: blur")
    assert embedding_view(pipe, GenerationRequest.create("a castle on a hill")) is pipe
    assert embedding_view(pipe, GenerationRequest.create("a mystyle castle")).model.graph("text_encoder") is not \
        pipe.model.graph("text_encoder")
    fresh = StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")
    a = run(pipe, "a castle on a hill", latents, negative_prompt="blur")
    b = run(fresh, "a castle on a hill", latents, negative_prompt="blur")
    assert np.array_equal(a, b)
    assert request.prompt == ("a castle on a hill",)


def test_tokens_match_diffusers_tokenizer(pipe, tiny_folder, folder):
    ref = diffusers_pipe(tiny_folder, [(folder / "glowy.safetensors", "glowy"),
                                       (folder / "mystyle.safetensors", "mystyle")])
    prompts = ["a mystyle castle", "mystyle, glowy mystyles", "glowymystyle", "a " * 80 + "mystyle",
               "a " * 73 + "mystyle end"]
    view = embedding_view(pipe, GenerationRequest.create("mystyle"))
    ours = view.model.tokenizers["tokenizer"](prompts, on_truncate=lambda i, text: None)
    theirs = ref.tokenizer(ref.maybe_convert_prompt(prompts, ref.tokenizer), padding="max_length", max_length=77,
                           truncation=True, return_tensors="np").input_ids
    assert np.array_equal(ours, theirs)
    assert (ours[1] >= 49408).sum() == 3 + 1 + 3            # mystyle, glowy, and the 'mystyle' of 'mystyles'


def test_a1111_syntax_finds_embeddings_as_a1111(pipe, latents):
    view = embedding_view(pipe, GenerationRequest.create("mystyle"))
    tok = view.model.tokenizers["tokenizer"]
    base = tok.base.backend.encode("a mystyle, mystyles (glowy:1.2)", add_special_tokens=False).ids
    ids = tok.a1111_ids(base)
    assert ids.count(49409) == 1 and 49408 in ids            # glowy (49408) and mystyle (49409..); A1111 reads
                                                             # 'mystyles' as another word, diffusers does not
    plain = run(pipe, "a mystyle castle", latents)
    a1111 = run(pipe, "a mystyle castle", latents, prompt_syntax="a1111")
    weighted = run(pipe, "a (mystyle:1.4) castle", latents, prompt_syntax="a1111")
    assert np.abs(plain - a1111).max() <= 1e-5                # weight 1: A1111's encoding equals diffusers'
    assert np.abs(weighted - a1111).max() > 1e-3


def test_listing_is_a1111s_embeddings_response(pipe):
    listed = list_embeddings(pipe)
    assert listed["loaded"] == {
        "glowy": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 1},
        "mystyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 3}}
    assert list(listed["skipped"]) == ["sd2thing"] and listed["skipped"]["sd2thing"]["shape"] == 1024
    pipe.embeddings_dir = None
    assert list_embeddings(pipe) == {"loaded": {}, "skipped": {}}


def test_bad_embeddings_are_one_line_errors(pipe, folder, tmp_path):
    with pytest.raises(UserError, match=r"sd2thing .*1024-wide vectors; this model's text encoder takes 32"):
        pipe("a sd2thing castle", num_inference_steps=1, height=SIZE, width=SIZE, output_type="np")
    write(tmp_path / "cat.safetensors", vectors(3, 1))
    with pytest.raises(UserError, match="'cat' is already a word of the tokenizer's vocabulary"):
        pipe.load_textual_inversion(tmp_path / "cat.safetensors")
    (tmp_path / "old.pt").write_bytes(b"not really a pickle")
    with pytest.raises(UserError, match=r"pickled checkpoints \(\.pt\) can run code"):
        pipe.load_textual_inversion(tmp_path / "old.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 12)
    save_file({"a": vectors(4, 1), "b": vectors(4, 1)}, str(tmp_path / "two.safetensors"))
    pipe.embeddings_dir = tmp_path
    for word, message in (("cat", "already a word"), ("old", "pickled"), ("broken", "not a readable .safetensors"),
                          ("two", "not a textual-inversion embedding")):
        with pytest.raises(UserError, match=message):
            pipe(f"a {word} castle", num_inference_steps=1, height=SIZE, width=SIZE, output_type="np")
    with pytest.raises(UserError, match="no such folder"):
        use_folder(pipe, tmp_path / "missing")
    with pytest.raises(UserError, match="no such embedding file"):
        pipe.load_textual_inversion(tmp_path / "missing.safetensors")


def test_cli_generate_with_embeddings(ours, tiny_export, folder, tmp_path, latents):
    from runtime.cli import main

    np.save(tmp_path / "z.npy", latents.numpy())
    args = ["generate", "--model", str(tiny_export[0]), "--prompt", "a mystyle castle", "--steps", str(STEPS),
            "--width", str(SIZE), "--height", str(SIZE), "--latents", str(tmp_path / "z.npy"), "--provider", "cpu",
            "--quiet", "--out", str(tmp_path / "out.npy")]
    result = CliRunner().invoke(main, args + ["--embeddings", str(folder)])
    assert result.exit_code == 0, result.output
    ours.embeddings_dir = folder
    try:
        expected = run(ours, "a mystyle castle", latents, guidance_scale=7.5)
    finally:
        ours.embeddings_dir = None
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= 1e-5
    missing = CliRunner().invoke(main, args + ["--embeddings", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "no such folder" in missing.output
    assert "Traceback" not in missing.output


def test_server_registry_lists_and_applies_the_folder(tiny_export, folder):
    from runtime.serve.registry import ModelRegistry, available_embeddings

    registry = ModelRegistry(tiny_export[0], provider="cpu", embeddings_dir=folder)
    listed = available_embeddings(registry)
    assert sorted(listed["loaded"]) == ["glowy", "mystyle"] and sorted(listed["skipped"]) == ["sd2thing"]
    served = registry.pipeline()[0]
    assert embedding_view(served, GenerationRequest.create("a glowy castle")) is not served
    assert available_embeddings(ModelRegistry(tiny_export[0], provider="cpu")) == {"loaded": {}, "skipped": {}}


def test_served_embeddings_dir_is_listed_at_sdapi(tiny_export, folder, tmp_path):
    """`runtime serve --embeddings-dir DIR`: /sdapi/v1/embeddings answers A1111's shape; a missing folder is refused."""
    from serve_util import Served

    from runtime.errors import UserError
    from runtime.serve.settings import ServeSettings

    served = Served(ServeSettings(tiny_export[0], embeddings_dir=folder))
    try:
        reply = served.get("/sdapi/v1/embeddings")
    finally:
        served.stop()
    assert reply.status == 200 and sorted(reply.body["loaded"]) == ["glowy", "mystyle"]
    assert sorted(reply.body["skipped"]) == ["sd2thing"]
    with pytest.raises(UserError, match="--embeddings-dir .*: no such folder"):
        ServeSettings(tiny_export[0], embeddings_dir=tmp_path / "none")


@pytest.mark.slow
def test_sdxl_clip_l_clip_g_embedding_matches_diffusers(tmp_path, latents):
    import diffusers
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile
    from sdexport.tiny import tiny_folder

    folder = tiny_folder("tiny-sdxl")
    convert(ConvertConfig("tiny-sdxl", load_profile("cpu"), tmp_path / "xl", verify=False))
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    widths = (ref.text_encoder.config.hidden_size, ref.text_encoder_2.config.hidden_size)
    pair = {"clip_l": vectors(6, 2, widths[0]), "clip_g": vectors(7, 2, widths[1])}
    (tmp_path / "emb").mkdir()
    save_file(pair, str(tmp_path / "emb" / "xlthing.safetensors"))
    ref.load_textual_inversion(torch.from_numpy(pair["clip_l"]), token="xlthing", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(torch.from_numpy(pair["clip_g"]), token="xlthing", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ours = StableDiffusionPipeline.from_pretrained(tmp_path / "xl", provider="cpu")
    base = run(ours, "a xlthing castle", latents)
    use_folder(ours, tmp_path / "emb")
    a = run(ours, "a xlthing castle", latents)
    assert np.abs(a - base).max() > 0.05
    assert np.abs(a - run(ref, "a xlthing castle", latents)).max() <= 1e-3
    write(tmp_path / "emb" / "sd15thing.safetensors", vectors(8, 1, widths[0]))
    with pytest.raises(UserError, match=rf"{widths[0]}-wide vectors; this model's text encoders take "
                                        rf"{sum(widths)} \(clip_l \+ clip_g\) = {widths[0]} \+ {widths[1]}"):
        run(ours, "a sd15thing castle", latents)


def test_a1111_keeps_an_embedding_in_one_chunk():
    """As A1111's tokenize_line: an embedding whose vectors do not fit in the rest of a chunk starts the next one
    (the current chunk is padded); one that fits stays; plain tokens still fill chunks to 75."""
    from runtime.a1111.chunking import CHUNK_LENGTH, ChunkTokenizer, chunk_prompt

    emb = (900, 901, 902)
    words = {"w": [5], "e": list(emb)}

    def encode(texts):
        return [[t for word in text.split() for t in words[word]] for text in texts]

    tok = ChunkTokenizer(encode, bos=1, eos=2, pad=2, comma=None, spans={900: 3})
    moved = chunk_prompt([(" ".join(["w"] * 73 + ["e"]), 1.0)], tok).chunks
    assert len(moved) == 2
    assert moved[0].ids[1:74] == (5,) * 73 and moved[0].ids[74:] == (2,) * 3          # eos, then pad
    assert moved[1].ids[1:4] == emb
    fits = chunk_prompt([(" ".join(["w"] * 72 + ["e"]), 1.3)], tok).chunks
    assert len(fits) == 1 and fits[0].ids[73:76] == emb and fits[0].weights[73:76] == (1.3,) * 3
    plain = chunk_prompt([(" ".join(["w"] * (CHUNK_LENGTH + 1)), 1.0)], ChunkTokenizer(encode, 1, 2, 2, None)).chunks
    assert len(plain) == 2 and plain[0].ids[1:76] == (5,) * CHUNK_LENGTH
