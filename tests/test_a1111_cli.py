"""AUTOMATIC1111 compatibility of `runtime generate`: --from-png, the infotext it writes, inpaint and outpaint."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from runtime.a1111.infotext import parameters_from_png, parse_parameters
from runtime.cli import main
from runtime.images import a1111_parameters


def run(*args):
    """Invoke the CLI; return the result."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def base(folder, out, *extra):
    """A small, fast generate command."""
    return ["generate", "--model", folder, "--steps", "3", "--seed", "7", "--quiet", "--out", out, *extra]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 64x64 init image and a mask whose white 32x32 square sits in the middle."""
    d = tmp_path_factory.mktemp("a1111")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d


def pixels(path):
    """An image file as an int array (H, W, 3)."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_infotext_writes_sampler_and_schedule_type_quoted():
    text = a1111_parameters("a, b", "", 20, ("DPM++ 2M", "Karras"), 7.0, 1, 64, 64, "my, model")
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
    p = parse_parameters(text)
    assert (p.sampler, p.schedule_type, p.model, p.prompt) == ("DPM++ 2M", "Karras", "my, model", "a, b")


def test_from_png_regenerates_the_same_image(tiny_export, tmp_path):
    folder = tiny_export[0]
    first = tmp_path / "a.png"
    args = ["--prompt", "a (red:1.2) cat", "--negative-prompt", "blur", "--prompt-syntax", "a1111",
            "--scheduler", "dpm++2m-karras", "--guidance", "5", "--width", "64", "--height", "64"]
    assert run(*base(folder, first, *args)).exit_code == 0
    p = parameters_from_png(first)
    assert (p.sampler, p.schedule_type, p.steps, p.seed) == ("DPM++ 2M", "Karras", 3, 7)
    again = tmp_path / "b.png"
    r = run("generate", "--model", folder, "--from-png", first, "--quiet", "--out", again)
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels(first), pixels(again))
    other = tmp_path / "c.png"
    assert run("generate", "--model", folder, "--from-png", first, "--seed", "8", "--quiet", "--out", other).exit_code == 0
    assert parameters_from_png(other).seed == 8 and not np.array_equal(pixels(first), pixels(other))


def test_from_png_warns_once_about_unknown_fields(tiny_export, tmp_path):
    from runtime.images import save_png

    png = tmp_path / "in.png"
    save_png(png, np.zeros((64, 64, 3), np.uint8), a1111_parameters(
        "a cat", "", 3, ("Euler a", "Automatic"), 7.0, 1, 64, 64, "x", {"Hires upscale": 2, "Lora hashes": "a: b"}))
    r = run("generate", "--model", tiny_export[0], "--from-png", png, "--quiet", "--out", tmp_path / "o.npy")
    assert r.exit_code == 0
    warned = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "Hires upscale" in warned[0] and "Lora hashes" in warned[0]


def test_mask_blur_keeps_unmasked_pixels_and_invert_swaps_regions(tiny_export, source, tmp_path):
    init, inside, outside = pixels(source / "init.png"), np.s_[27:37, 27:37], np.s_[:5, :5]   # 11 px from the edge
    for name, flags in (("plain", []), ("inverted", ["--invert-mask"])):
        out = tmp_path / f"{name}.png"
        r = run(*base(tiny_export[0], out, "--prompt", "a cat", "--init-image", source / "init.png",
                      "--mask", source / "mask.png", "--mask-blur", "4", *flags))
        assert r.exit_code == 0, r.output
        got = pixels(out)
        kept, changed = (outside, inside) if name == "plain" else (inside, outside)
        assert np.array_equal(got[kept], init[kept]) and not np.array_equal(got[changed], init[changed])


@pytest.mark.parametrize("fill", ["fill", "latent-noise", "latent-nothing"])
def test_inpaint_full_res_returns_the_input_size(tiny_export, source, tmp_path, fill):
    out = tmp_path / "full.png"
    r = run(*base(tiny_export[0], out, "--prompt", "a cat", "--init-image", source / "init.png", "--mask",
                  source / "mask.png", "--inpaint-full-res", "--inpaint-padding", "8", "--inpainting-fill", fill))
    assert r.exit_code == 0, r.output
    got = pixels(out)
    assert got.shape == (64, 64, 3) and np.array_equal(got[:5], pixels(source / "init.png")[:5])


def test_outpaint_keeps_the_original_region(tiny_export, source, tmp_path):
    out = tmp_path / "out.png"
    r = run(*base(tiny_export[0], out, "--prompt", "a cat", "--init-image", source / "init.png",
                  "--outpaint", "16,0,16,16"))
    assert r.exit_code == 0, r.output
    got = pixels(out)
    assert got.shape == (80, 96, 3) and np.array_equal(got[0:64, 16:80], pixels(source / "init.png"))


@pytest.mark.parametrize("value, words", [("8,0,4,0", "multiple of 8"), ("8,8", "LEFT,TOP,RIGHT,BOTTOM"),
                                          ("0,0,0,0", "at least one side")])
def test_bad_outpaint_is_one_line(tiny_export, source, tmp_path, value, words):
    r = CliRunner().invoke(main, [str(a) for a in base(tiny_export[0], tmp_path / "x.png", "--prompt", "a",
                                                       "--init-image", source / "init.png", "--outpaint", value)])
    assert r.exit_code != 0 and words in r.output and len(r.output.strip().splitlines()) == 1
