"""Tiled VAE decoding: tile placement and blending, against the untiled decoder and diffusers' tiled_decode."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from runtime import metrics
from runtime.errors import UserError
from runtime.model import open_model
from runtime.vae_tiling import VaeTiling, plan_axis

LAYOUTS = ("even", "diffusers")


def _local_decoder(z: np.ndarray) -> np.ndarray:
    """A decoder whose every output pixel depends on one latent only: (1, 4, h, w) -> (1, 3, 8h, 8w)."""
    up = np.repeat(np.repeat(z[:, :3], 8, axis=2), 8, axis=3)
    return np.tanh(up + 0.1 * z[:, 3:4].repeat(8, axis=2).repeat(8, axis=3))


def _latents(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, h, w)).astype(np.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("h, w, tile", [(40, 56, 16), (33, 47, 16), (64, 20, 24), (16, 16, 16), (100, 9, 32)])
def test_tiles_reassemble_a_local_decoder_exactly(layout, h, w, tile):
    # blending weights sum to one and every tile lands where it was cut from: a pixel-local decoder is unchanged
    z = _latents(h, w)
    tiled = VaeTiling(tile, 0.25, layout).decode(z, _local_decoder, 8)
    assert tiled.shape == (1, 3, 8 * h, 8 * w)
    assert metrics.max_abs(_local_decoder(z), tiled) < 1e-6


@pytest.mark.parametrize("size, tile, overlap", [(56, 16, 0.25), (47, 16, 0.5), (100, 32, 0.25), (17, 16, 0.1),
                                                  (128, 64, 0.25), (64, 64, 0.25)])
def test_even_plan_covers_the_axis_with_equal_overlapping_tiles(size, tile, overlap):
    plan = plan_axis(size, tile, overlap)
    assert plan[0][0] == 0 and plan[-1][0] + min(tile, size) == size
    cover = np.zeros(size, dtype=int)
    for offset, _, _ in plan:
        cover[offset:offset + tile] += 1
    assert cover.min() >= 1 and cover.max() <= 2              # covered, never by three tiles
    for (a, _, after), (b, before, _) in zip(plan, plan[1:]):
        assert after == before == a + tile - b > 0            # neighbours overlap by what both record


def test_tiled_matches_untiled_on_the_tiny_vae(tiny_export):
    # GroupNorm statistics are per tile, so tiles differ from one full pass (as in diffusers); measured 29.8 dB
    dec = open_model(tiny_export[0], provider="cpu").graph("vae_decoder")
    run = lambda z: dec(latent_sample=z)["sample"]  # noqa: E731
    z = _latents(24, 40)
    full = np.clip(run(z) / 2 + 0.5, 0, 1)
    tiled = np.clip(VaeTiling(20, 0.25).decode(z, run, 8) / 2 + 0.5, 0, 1)
    assert metrics.psnr(full, tiled, peak=1.0) >= 27.0


def test_diffusers_layout_equals_diffusers_tiled_decode(tiny_export, tiny_components):
    torch = pytest.importorskip("torch")
    vae = tiny_components.modules["vae"]
    dec = open_model(tiny_export[0], provider="cpu").graph("vae_decoder")
    z = _latents(24, 40)
    for tile in (16,):
        vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = tile, tile * 8, 0.25
        with torch.no_grad():
            expected = vae.tiled_decode(torch.from_numpy(z), return_dict=False)[0].numpy()
        got = VaeTiling(tile, 0.25, "diffusers").decode(z, lambda x: dec(latent_sample=x)["sample"], 8)
        assert metrics.max_abs(expected, got) < 1e-4, tile


def test_small_latents_are_decoded_in_one_pass():
    calls = []
    z = _latents(16, 16)
    VaeTiling(16).decode(z, lambda x: calls.append(x.shape) or _local_decoder(x), 8)
    assert calls == [(1, 4, 16, 16)]


@pytest.mark.parametrize("kwargs", [{"tile": 2}, {"overlap": 1.0}, {"layout": "spiral"}])
def test_bad_tiling_is_refused(kwargs):
    with pytest.raises(UserError, match="VAE tiling"):
        VaeTiling(**kwargs)


def test_vae_tiling_on_the_command_line(tiny_export, tmp_path):
    from runtime.cli import main

    args = ["generate", "--model", str(tiny_export[0]), "--prompt", "a cat", "--steps", "1", "--seed", "3", "--quiet"]
    runner = CliRunner()
    plain = runner.invoke(main, args + ["--out", str(tmp_path / "a.npy")], catch_exceptions=False)
    tiled = runner.invoke(main, args + ["--vae-tiling", "--vae-tile-size", "128", "--out", str(tmp_path / "b.npy")],
                          catch_exceptions=False)
    assert plain.exit_code == 0 and tiled.exit_code == 0, (plain.output, tiled.output)
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == b.shape and 0 < metrics.max_abs(a, b) and metrics.psnr(a, b, peak=1.0) >= 25.0
    bad = runner.invoke(main, args + ["--vae-tiling", "--vae-tile-size", "100", "--out", str(tmp_path / "c.npy")])
    assert bad.exit_code == 2 and "--vae-tile-size must be a positive multiple of 8" in bad.stderr


@pytest.mark.parametrize("one_shot", [False, True])
def test_one_shot_decode_releases_the_other_sessions(tiny_export, one_shot):
    # the CLI (one request per process) frees encoders and UNet before decoding; a server keeps them loaded
    from runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(open_model(tiny_export[0], provider="cpu", one_shot=one_shot))
    image = pipe("a cat", num_inference_steps=1, seed=1, output_type="np").images
    assert sorted(pipe.model._graphs) == (["vae_decoder"] if one_shot else ["text_encoder", "unet", "vae_decoder"])
    again = pipe("a cat", num_inference_steps=1, seed=1, output_type="np").images     # rebuilt on use
    assert metrics.max_abs(image, again) == 0.0
