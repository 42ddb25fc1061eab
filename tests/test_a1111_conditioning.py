"""A1111 prompt syntax end to end, against a reference built here from the tiny model's PyTorch modules.

The reference applies A1111's rules plainly (sd_hijack_clip.py tokenize_line / forward, sd_emphasis.py
EmphasisOriginal): prompts are given as hand-parsed runs of (text, weight), tokenized with transformers'
CLIPTokenizer, chunked, encoded chunk by chunk with CLIPTextModel, weighted and mean-rescaled, then fed to
diffusers as prompt_embeds. Different cond/uncond lengths (which diffusers refuses) are checked against a loop
over diffusers' own UNet, scheduler and VAE that makes the cond and uncond calls apart, as A1111 does.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime.cli import main
from runtime.conditioning import encode
from runtime.pipeline import StableDiffusionPipeline
from sdexport.tiny import tiny_folder

SIZE, STEPS, GUIDANCE = 64, 6, 7.5
BREAK = ("BREAK", -1.0)
PHRASE = "a tall lighthouse on a rocky coast, stormy sea, golden light, "
LONG = PHRASE * 11                                       # about 150 tokens, commas every few tokens


def chunk_runs(tok, runs, pad: int) -> list:
    """tokenize_line: 75 tokens per chunk, comma back-tracking 20, BREAK closes a chunk; (ids, weights) each, ids
    after the first eos set to `pad` (process_tokens: eos for CLIP, 0 for OpenCLIP)."""
    bos, eos, comma = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids(",</w>")
    chunks, ids, weights, last_comma = [], [], [], -1

    def close():
        nonlocal ids, weights, last_comma
        fill = 75 - len(ids)
        chunks.append(([bos] + ids + [eos] + [pad] * fill, [1.0] + weights + [1.0] * (fill + 1)))
        ids, weights, last_comma = [], [], -1

    for text, weight in runs:
        if (text, weight) == BREAK:
            close()
            continue
        for token in tok(text, add_special_tokens=False, truncation=False)["input_ids"]:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == 75 and last_comma != -1 and len(ids) - last_comma <= 20:
                moved = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == 75:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


class Reference:
    """A1111's chunking and emphasis on transformers' CLIP modules, and diffusers' pipeline on the embeddings."""

    def __init__(self, folder):
        import diffusers
        import transformers

        self.tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False)
        self.pipe.scheduler = diffusers.DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)

    def chunks(self, runs) -> list:
        """tokenize_line with A1111's CLIP padding (eos)."""
        return chunk_runs(self.tok, runs, self.tok.eos_token_id)

    def states(self, ids, clip_skip: int = 1) -> torch.Tensor:
        """encode_with_transformers: last_hidden_state, or for Clip skip N > 1 final_layer_norm(hidden_states[-N])."""
        out = self.encoder(torch.tensor([ids]), output_hidden_states=True)
        if clip_skip == 1:
            return out.last_hidden_state                                            # (1, 77, D)
        norm = getattr(self.encoder, "text_model", self.encoder).final_layer_norm  # transformers 5: no text_model
        return norm(out.hidden_states[-clip_skip])

    @torch.no_grad()
    def embeds(self, runs, clip_skip: int = 1) -> torch.Tensor:
        """EmphasisOriginal per chunk (z * w, rescaled to the unweighted mean), chunks joined on the sequence axis."""
        parts = []
        for ids, weights in self.chunks(runs):
            z = self.states(ids, clip_skip)                                         # (1, 77, D)
            mean = z.mean()
            z = z * torch.tensor(weights)[None, :, None]
            parts.append(z * (mean / z.mean()))
        return torch.cat(parts, dim=1)                                              # (1, 77 * n, D)

    @torch.no_grad()
    def images(self, runs, negative_runs, latents, clip_skip: int = 1) -> np.ndarray:
        """diffusers' pipeline on the reference embeddings (A1111 applies Clip skip to both prompts)."""
        return self.pipe(prompt_embeds=self.embeds(runs, clip_skip),
                         negative_prompt_embeds=self.embeds(negative_runs, clip_skip),
                         latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                         width=SIZE, output_type="np").images

    @torch.no_grad()
    def images_apart(self, cond, uncond, latents) -> np.ndarray:
        """diffusers' denoising loop with the uncond and cond UNet calls made separately (lengths differ)."""
        pipe, sched = self.pipe, self.pipe.scheduler
        sched.set_timesteps(STEPS)
        x = latents * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            u = pipe.unet(x_in, t, encoder_hidden_states=uncond).sample
            c = pipe.unet(x_in, t, encoder_hidden_states=cond).sample
            x = sched.step(u + GUIDANCE * (c - u), t, x).prev_sample
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def shifted(shifted_tiny):
    """(folder, our pipeline on its export): the tiny model with a shifted text encoder (conftest.shifted_tiny)."""
    return shifted_tiny[0], StableDiffusionPipeline.from_pretrained(shifted_tiny[1], provider="cpu")


@pytest.fixture(scope="module")
def ref(shifted):
    return Reference(shifted[0])


@pytest.fixture(scope="module")
def ours(shifted):
    return shifted[1]


@pytest.fixture(scope="module")
def latents():
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(11))


def run_ours(ours, prompt, negative, latents, syntax="a1111"):
    return ours(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                width=SIZE, latents=latents.numpy(), scheduler="ddim", output_type="np",
                prompt_syntax=syntax).images


CASES = {   # name -> (prompt, its runs as A1111 parses it, negative, its runs)
    "weighted": ("a (red:1.3) lighthouse, [fog], ((stormy)) sea", [("a ", 1.0), ("red", 1.3), (" lighthouse, ", 1.0),
                 ("fog", 1 / 1.1), (", ", 1.0), ("stormy", 1.1 * 1.1), (" sea", 1.0)],
                 "(blurry:1.2), lowres", [("blurry", 1.2), (", lowres", 1.0)]),
    "break": ("a lighthouse BREAK at dusk, oil painting",
              [("a lighthouse", 1.0), BREAK, ("at dusk, oil painting", 1.0)], "blurry BREAK lowres", [("blurry", 1.0), BREAK, ("lowres", 1.0)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(ours, ref, latents, name):
    prompt, runs, negative, negative_runs = CASES[name]
    a = run_ours(ours, prompt, negative, latents)
    b = ref.images(runs, negative_runs, latents)
    assert a.shape == b.shape == (1, SIZE, SIZE, 3)
    assert np.abs(a - b).max() <= 1e-3, name


def test_long_prompt_matches_reference(ours, ref, latents):
    prompt, runs = LONG + "(golden hour:1.2)", [(LONG, 1.0), ("golden hour", 1.2)]
    n = len(ref.chunks(runs))
    assert n >= 2 and len(ref.tok(LONG)["input_ids"]) > 150
    negative = " BREAK ".join(["blurry"] * n)                 # same chunk count: diffusers needs equal lengths
    negative_runs = [r for i in range(n) for r in ([BREAK] if i else []) + [("blurry", 1.0)]]
    a = run_ours(ours, prompt, negative, latents)
    b = ref.images(runs, negative_runs, latents)
    assert np.abs(a - b).max() <= 1e-3


def test_different_chunk_counts_run_cond_and_uncond_apart(ours, ref, latents):
    prompt, runs = LONG, [(LONG, 1.0)]
    cond = encode(ours.model, [prompt], "blurry", 1, SIZE, SIZE, GUIDANCE, "a1111")
    assert cond.negative_embeds is not None and cond.negative_embeds.shape[1] == 77
    assert cond.embeds.shape[1] == 77 * len(ref.chunks(runs)) and len(cond.passes()) == 2
    a = run_ours(ours, prompt, "blurry", latents)
    b = ref.images_apart(ref.embeds(runs), ref.embeds([("blurry", 1.0)]), latents)
    assert np.abs(a - b).max() <= 1e-3


def test_plain_syntax_is_literal(ours, ref, latents):
    """Plain mode ignores the syntax: the same images as diffusers given the prompt as text."""
    prompt = "a (red:1.3) lighthouse"
    a = run_ours(ours, prompt, "blurry", latents, syntax="plain")
    with torch.no_grad():
        b = ref.pipe(prompt, negative_prompt="blurry", latents=latents, num_inference_steps=STEPS,
                                        guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="np").images
    assert np.abs(a - b).max() <= 1e-3


@pytest.fixture(scope="module")
def sdxl(family_export):
    return StableDiffusionPipeline.from_pretrained(family_export("tiny-sdxl")[1], provider="cpu")


@pytest.mark.parametrize("negative", [None, "blurry, (lowres:1.4)"])
def test_sdxl_long_prompt(sdxl, negative):
    cond = encode(sdxl.model, [LONG], negative, 1, SIZE, SIZE, GUIDANCE, "a1111")
    dims = sdxl.model.graph("unet").inputs["encoder_hidden_states"].shape[2]      # both encoders' features
    assert cond.embeds.shape[1] >= 154 and cond.embeds.shape[2] == dims
    assert (cond.negative_embeds is None) == (negative is None)          # no negative: zeros shaped like cond
    images = sdxl(LONG, negative_prompt=negative, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
                  prompt_syntax="a1111").images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()


class SdxlReference:
    """A1111 on SDXL: each encoder chunks alike (CLIP pads with eos, OpenCLIP with 0), gives its penultimate raw
    states with emphasis per chunk, features joined; pooled = the projected OpenCLIP output of the first chunk; an
    empty negative prompt is zeros (sd_models_xl.get_learned_conditioning, force_zero_negative_prompt)."""

    def __init__(self, folder):
        import diffusers
        import transformers

        self.toks = [transformers.CLIPTokenizer.from_pretrained(folder / t) for t in ("tokenizer", "tokenizer_2")]
        self.encoders = [transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
                         transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()]
        self.pads = [self.toks[0].eos_token_id, 0]
        self.pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
        self.pipe.scheduler = diffusers.DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def embeds(self, runs) -> tuple:
        """(states (1, 77 * n, D1 + D2), pooled (1, P))."""
        per_encoder, pooled = [], None
        for tok, encoder, pad in zip(self.toks, self.encoders, self.pads):
            parts = []
            for i, (ids, weights) in enumerate(chunk_runs(tok, runs, pad)):
                out = encoder(torch.tensor([ids]), output_hidden_states=True)
                z = out.hidden_states[-2]                                            # (1, 77, D_i)
                mean = z.mean()
                z = z * torch.tensor(weights)[None, :, None]
                parts.append(z * (mean / z.mean()))
                pooled = out.text_embeds if i == 0 and hasattr(out, "text_embeds") else pooled
            per_encoder.append(torch.cat(parts, dim=1))
        return torch.cat(per_encoder, dim=-1), pooled

    @torch.no_grad()
    def images(self, runs, negative_runs, latents) -> np.ndarray:
        """diffusers' SDXL pipeline on the reference embeddings; negative_runs None: the zeroed empty prompt."""
        cond, pooled = self.embeds(runs)
        uncond, uncond_pooled = ((torch.zeros_like(cond), torch.zeros_like(pooled)) if negative_runs is None
                                 else self.embeds(negative_runs))
        return self.pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                         negative_pooled_prompt_embeds=uncond_pooled, latents=latents, num_inference_steps=STEPS,
                         guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="np").images


SDXL_CASES = {   # name -> (prompt, runs, negative, negative runs (None: the empty prompt, zeroed))
    "weighted": CASES["weighted"],
    "break": CASES["break"],
    "empty-negative": ("a (red:1.3) lighthouse, [fog]", [("a ", 1.0), ("red", 1.3), (" lighthouse, ", 1.0),
                                                          ("fog", 1 / 1.1)], "", None),
    "long": (LONG + "(golden hour:1.2)", [(LONG, 1.0), ("golden hour", 1.2)], "blurry BREAK lowres BREAK fog",
             [("blurry", 1.0), BREAK, ("lowres", 1.0), BREAK, ("fog", 1.0)]),      # 3 chunks each
}


@pytest.mark.parametrize("name", sorted(SDXL_CASES))
def test_sdxl_matches_reference(sdxl, latents, name):
    prompt, runs, negative, negative_runs = SDXL_CASES[name]
    ref = SdxlReference(tiny_folder("tiny-sdxl"))
    assert negative_runs is None or len(chunk_runs(ref.toks[0], runs, 0)) == len(chunk_runs(ref.toks[0],
                                                                                           negative_runs, 0))
    a = run_ours(sdxl, prompt, negative, latents)
    b = ref.images(runs, negative_runs, latents)
    assert a.shape == b.shape == (1, SIZE, SIZE, 3)
    assert np.abs(a - b).max() <= 1e-3, name


def test_sdxl_ignores_clip_skip_as_a1111(sdxl, latents):
    with pytest.warns(UserWarning, match="ignored"):
        skipped = sdxl("a red cat", clip_skip=2, num_inference_steps=2, height=SIZE, width=SIZE,
                       latents=latents.numpy(), output_type="np", prompt_syntax="a1111").images
    plain = sdxl("a red cat", num_inference_steps=2, height=SIZE, width=SIZE, latents=latents.numpy(),
                 output_type="np", prompt_syntax="a1111").images
    assert np.array_equal(skipped, plain)


@pytest.mark.parametrize("prompt, words", [("(a:b)", ["'b'", "not a number"]), ("(a:", ["never closed"]),
                                           ("cat " * 10000, ["tokens", "limit"])])
def test_bad_prompts_give_one_line_errors(tiny_export, tmp_path, prompt, words):
    r = CliRunner().invoke(main, ["generate", "--model", str(tiny_export[0]), "--prompt", prompt, "--prompt-syntax",
                                  "a1111", "--steps", "2", "--width", "64", "--height", "64", "--seed", "1",
                                  "--quiet", "--out", str(tmp_path / "x.png")], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("syntax, prompt, noted", [("plain", "a (red) cat", True), ("plain", "a red cat", False),
                                                   ("a1111", "a (red) cat", False)])
def test_infotext_names_plain_syntax(tiny_export, tmp_path, syntax, prompt, noted):
    from PIL import Image

    out = tmp_path / "p.png"
    r = CliRunner().invoke(main, ["generate", "--model", str(tiny_export[0]), "--prompt", prompt, "--prompt-syntax",
                                  syntax, "--steps", "2", "--width", "64", "--height", "64", "--seed", "1", "--quiet",
                                  "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = Image.open(out).text["parameters"]
    assert text.startswith(prompt + "\n") and ("Prompt syntax: plain" in text) == noted, text
