"""AUTOMATIC1111's `parameters` text (infotext) read back into generation fields.

References (AUTOMATIC1111/stable-diffusion-webui):
- modules/infotext_utils.py parse_generation_parameters: the last line holds the parameters only when re_param
  finds at least 3 pairs in it; every other line is stripped; from the first line starting with
  "Negative prompt:" on, lines (that prefix removed) form the negative prompt; values in double quotes are
  JSON-unquoted; a WxH value is split in two; a missing "Clip skip" means 1, a missing "Schedule type" "Automatic".
- re_param there: \\s*(\\w[\\w \\-/]+):\\s*("(?:\\\\.|[^\\\\"])+"|[^,]*)(?:,|$)
- modules/infotext_utils.py quote (used by processing.create_infotext): a value holding ',', a newline or ':'
  is written JSON-quoted with ensure_ascii=False.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE = "Negative prompt:"
FIELDS = {                            # infotext key -> (ParsedParameters field, type)
    "Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("schedule_type", str),
    "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Clip skip": ("clip_skip", int),
    "Denoising strength": ("denoising_strength", float), "Model": ("model", str),
}


@dataclass(frozen=True)
class ParsedParameters:
    """The fields of one infotext we use; every other key, value kept as text in `unknown`."""
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    schedule_type: str = "Automatic"
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    denoising_strength: float | None = None
    model: str | None = None
    unknown: dict[str, str] = field(default_factory=dict)


def quote(value) -> str:
    """infotext_utils.quote: JSON-quote a value holding ',', a newline or ':' so it reads back whole."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def unquote(value: str) -> str:
    """A double-quoted value as the JSON string it is; anything else (or bad JSON) unchanged."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _joined(text: str, line: str) -> str:
    """Append a line as parse_generation_parameters does (no newline before the first non-empty text)."""
    return line if text == "" else f"{text}\n{line}"


def split_infotext(text: str) -> tuple[str, str, str]:
    """(prompt, negative prompt, parameters line) by parse_generation_parameters' line rules."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        if in_negative:
            negative = _joined(negative, line)
        else:
            prompt = _joined(prompt, line)
    return prompt, negative, last


def parameter_pairs(line: str) -> dict[str, str]:
    """The key: value pairs of a parameters line, quoted values unquoted; empty values skipped as A1111 does."""
    return {key: unquote(value) for key, value in RE_PARAM.findall(line) if value}


def _typed(key: str, value: str, kind: type):
    """A known field's value as its type, or a one-line error naming it."""
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"infotext field {key!r} has value {value!r}, not {kind.__name__}") from None


def parse_parameters(text: str) -> ParsedParameters:
    """parse_generation_parameters for the fields we use; unknown keys kept, not fatal."""
    prompt, negative, last = split_infotext(text)
    known, unknown = {}, {}
    for key, value in parameter_pairs(last).items():
        if key == "Size":
            size = RE_SIZE.match(value)
            if size is None:
                raise UserError(f"infotext field 'Size' has value {value!r}, not WIDTHxHEIGHT")
            known["width"], known["height"] = int(size.group(1)), int(size.group(2))
        elif key in FIELDS:
            name, kind = FIELDS[key]
            known[name] = _typed(key, value, kind)
        else:
            unknown[key] = value
    return ParsedParameters(prompt=prompt, negative_prompt=negative, unknown=unknown, **known)


def read_png_parameters(path) -> str:
    """The `parameters` text chunk of a PNG, or a one-line error when it is missing or the file is no PNG."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        with Image.open(path) as im:
            kind, text = im.format, im.info.get("parameters")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not a readable image ({type(e).__name__})") from None
    if kind != "PNG":
        raise UserError(f"{path} is a {kind} image, not a PNG with A1111 parameters")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{path} has no A1111 'parameters' text chunk")
    return str(text)


def parameters_from_png(path) -> ParsedParameters:
    """read_png_parameters then parse_parameters."""
    return parse_parameters(read_png_parameters(path))
