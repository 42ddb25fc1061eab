"""LoRA files by path or by name in a folder, and what a folder holds (`runtime loras`, /sdapi/v1/loras)."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError
from .formats import PICKLES, load_lora

SUFFIX = ".safetensors"


def find_lora(spec: str, lora_dir: Path | None) -> Path:
    """A LoRA file from a path, or a name (A1111 tag style, no extension) in `lora_dir`."""
    path = Path(spec).expanduser()
    if path.is_file() or lora_dir is None and path.suffix.lower() in PICKLES + (SUFFIX,):
        return path
    if lora_dir is None:
        raise UserError(f"LoRA {spec!r}: no such file (give a path, or --lora-dir to look names up in)")
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise UserError(f"--lora-dir {folder}: no such folder")
    for candidate in (folder / spec, folder / (spec + SUFFIX)):
        if candidate.is_file():
            return candidate
    matches = sorted(p for p in folder.rglob("*" + SUFFIX) if p.stem == Path(spec).stem)
    if matches:
        return matches[0]
    known = ", ".join(sorted(p.stem for p in folder.rglob("*" + SUFFIX))[:5]) or "none"
    raise UserError(f"no LoRA named {spec!r} in {folder} (it has: {known})")


def check_scale(spec, scale):
    """A LoRA weight: a finite number, or a (text encoder, UNet) pair of them as A1111's `<lora:x:te:unet>`."""
    if isinstance(scale, (tuple, list)) and len(scale) == 2:
        return tuple(check_scale(spec, s) for s in scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UserError(f"LoRA {spec}: weight must be a finite number, got {scale!r}")
    return float(scale)


def component_scale(scale, component: str) -> float:
    """The weight for one component: a pair's first value for text encoders, its second for the UNet."""
    if isinstance(scale, tuple):
        return scale[0] if component.startswith("text_encoder") else scale[1]
    return scale


def parse_lora_option(text: str) -> tuple[str, float]:
    """`--lora FILE[:WEIGHT]` -> (FILE, weight); the weight defaults to 1.0."""
    path, sep, weight = text.rpartition(":")
    if not sep or not weight or "/" in weight or "\\" in weight:
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise UserError(f"--lora {text}: the weight after ':' must be a number, got {weight!r}") from None
    return path, check_scale(path, value)


COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
              "lora_te2_": "text_encoder_2", "unet.": "unet", "text_encoder.": "text_encoder",
              "text_encoder_2.": "text_encoder_2"}


def describe(path: Path) -> dict:
    """name, format, rank, layers and components of one LoRA file."""
    lora = load_lora(path)
    comps = sorted({c for layer in lora.layers for p, c in COMPONENTS.items() if layer.key.startswith(p)})
    ranks = sorted({layer.rank for layer in lora.layers})
    return {"name": lora.name, "format": lora.format, "rank": ranks[0] if len(ranks) == 1 else ranks,
            "layers": len(lora.layers), "components": comps, "path": str(path), "metadata": lora.metadata}


def list_loras(lora_dir) -> list[dict]:
    """The LoRA files under a folder, as A1111's /sdapi/v1/loras lists them (name, alias, path, metadata),
    plus format, rank, layers and components; unreadable files are listed with an `error`."""
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such LoRA folder")
    out = []
    for path in sorted(folder.rglob("*" + SUFFIX)):
        try:
            info = describe(path)
        except UserError as e:
            info = {"name": path.stem, "path": str(path), "metadata": {}, "error": str(e)}
        alias = info["metadata"].get("ss_output_name", info["name"]) if isinstance(info["metadata"], dict) else None
        out.append(info | {"alias": alias or info["name"]})
    return out
