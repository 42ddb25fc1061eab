"""Reading A1111 `parameters` text back: its parser's rules, our writer's round trip and PNG chunks."""
import numpy as np
import pytest
from PIL import Image

from runtime.a1111.infotext import (
    ParsedParameters, parameter_pairs, parameters_from_png, parse_parameters, quote, read_png_parameters,
    split_infotext,
)
from runtime.errors import UserError
from runtime.images import a1111_parameters, save_png

# The example in parse_generation_parameters' docstring (modules/infotext_utils.py).
DOCSTRING_EXAMPLE = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, \
heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, \
mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""

PROMPTS = [
    ("a lighthouse at dusk", ""),
    ("a cat, sitting on a mat, (masterpiece:1.2)", "blurry, lowres, bad hands"),
    ('a "quoted" sign, saying "hi, there"', 'no "text", please'),
    ("first line, with commas\nsecond line: style: watercolor\n\nafter a blank line", "neg one\nneg: two, three"),
    ("", "only a negative"),
]


def test_docstring_example():
    p = parse_parameters(DOCSTRING_EXAMPLE)
    assert p.prompt.startswith("girl with an artist's beret") and p.prompt.endswith("detailed, intricate")
    assert p.negative_prompt.startswith("ugly, fat") and p.negative_prompt.endswith("messy drawing")
    assert (p.steps, p.sampler, p.cfg_scale, p.seed, p.width, p.height) == (20, "Euler a", 7.0, 965400086, 512, 512)
    assert p.unknown == {"Model hash": "45dee52b"}
    assert (p.clip_skip, p.schedule_type, p.model, p.denoising_strength) == (1, "Automatic", None, None)


def test_a1111_style_line_with_every_field_we_use():
    text = ("a castle\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
            "Seed: 1, Size: 512x768, Model hash: abc, Model: x, Denoising strength: 0.55, Clip skip: 2, "
            'Lora hashes: "add_detail: 7c6bad76eb54, film: 1a2b", Version: v1.10.1')
    assert parse_parameters(text) == ParsedParameters(
        prompt="a castle", negative_prompt="fog", steps=20, sampler="DPM++ 2M", schedule_type="Karras",
        cfg_scale=7.0, seed=1, width=512, height=768, clip_skip=2, denoising_strength=0.55, model="x",
        unknown={"Model hash": "abc", "Lora hashes": "add_detail: 7c6bad76eb54, film: 1a2b", "Version": "v1.10.1"})


def test_line_rules():
    # fewer than 3 pairs on the last line: it is prompt text, not parameters
    assert split_infotext("a dog\nSteps: 20, Seed: 3") == ("a dog\nSteps: 20, Seed: 3", "", "")
    # lines are stripped, and the negative prompt runs to the parameters line
    text = "  spaced  \nNegative prompt:   a\n  b  \nSteps: 1, Seed: 2, Size: 8x8"
    assert split_infotext(text) == ("spaced", "a\nb", "Steps: 1, Seed: 2, Size: 8x8")
    assert parse_parameters("just a prompt") == ParsedParameters(prompt="just a prompt")


def test_quoted_values_and_quote_rule():
    # keys are at least two characters (re_param's \\w[\\w \\-/]+)
    assert parameter_pairs('Aa: 1, Bb: "x, y", Cc: "say \\"hi\\"", Dd: , Ee: plain, F: 2') == {
        "Aa": "1", "Bb": "x, y", "Cc": 'say "hi"', "Ee": "plain"}
    for value in ["x, y", "a: b", "two\nlines", 'q"uote, d']:
        assert parameter_pairs(f"Aa: 1, Key: {quote(value)}, Bb: 2")["Key"] == value
    assert quote("Euler a") == "Euler a" and quote(7.5) == "7.5"


@pytest.mark.parametrize("prompt, negative", PROMPTS)
def test_our_writer_round_trips(prompt, negative):
    extra = {"Schedule type": "Karras", "Clip skip": 2, "Denoising strength": 0.75, "Model hash": "abc123"}
    text = a1111_parameters(prompt, negative, 25, "DPM++ 2M", 7.5, 42, 640, 512, "sd15-cuda", extra)
    assert parse_parameters(text) == ParsedParameters(
        prompt=prompt, negative_prompt=negative, steps=25, sampler="DPM++ 2M", schedule_type="Karras",
        cfg_scale=7.5, seed=42, width=640, height=512, clip_skip=2, denoising_strength=0.75, model="sd15-cuda",
        unknown={"Model hash": "abc123"})


def test_our_png_round_trips(tmp_path):
    prompt, negative = PROMPTS[3]
    text = a1111_parameters(prompt, negative, 4, "Euler a", 1.0, 7, 16, 8, "tiny")
    path = tmp_path / "out.png"
    save_png(path, np.zeros((8, 16, 3), np.uint8), text)
    assert read_png_parameters(path) == text
    p = parameters_from_png(path)
    assert (p.prompt, p.negative_prompt, p.steps, p.width, p.height, p.model) == (prompt, negative, 4, 16, 8, "tiny")


def one_line_error(call) -> str:
    """Run call, expecting a one-line UserError; return its message."""
    with pytest.raises(UserError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_files_and_values_give_one_line_errors(tmp_path):
    plain, jpeg, text = tmp_path / "plain.png", tmp_path / "photo.jpg", tmp_path / "notes.png"
    Image.new("RGB", (8, 8)).save(plain)
    Image.new("RGB", (8, 8)).save(jpeg)
    text.write_text("not an image")
    assert "does not exist" in one_line_error(lambda: read_png_parameters(tmp_path / "missing.png"))
    assert "no A1111 'parameters'" in one_line_error(lambda: read_png_parameters(plain))
    assert "not a PNG" in one_line_error(lambda: read_png_parameters(jpeg))
    assert "not a readable image" in one_line_error(lambda: read_png_parameters(text))
    assert "'Steps'" in one_line_error(lambda: parse_parameters("p\nSteps: many, Seed: 1, Size: 8x8"))
    assert "'Size'" in one_line_error(lambda: parse_parameters("p\nSteps: 2, Seed: 1, Size: big"))
