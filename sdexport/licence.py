"""A model's licence, as its model card states it: the use restrictions a deployment must keep with the weights.

Hugging Face model cards carry it in README.md's YAML front matter (`license:`, and `license_name:` where the
licence is `other`, e.g. Stability AI's community licences); single-file checkpoints may carry it in the
safetensors header (`modelspec.license`, Stability AI's model spec).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

UNKNOWN = "unknown"
BUILT_IN = "apache-2.0"      # the built-in tiny models: random weights made by this project's own code
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def card_licence(text: str) -> str:
    """The licence in a model card's front matter, or "unknown"."""
    m = _FRONT_MATTER.match(text.lstrip("\ufeff"))
    if not m:
        return UNKNOWN
    fields = {}
    for line in m.group(1).splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "\t", "-")):
            fields[key.strip()] = value.strip().strip("'\"")
    licence = fields.get("license", "")
    if licence == "other" and fields.get("license_name"):
        licence = fields["license_name"]
    return licence or UNKNOWN


def folder_licence(folder: Path) -> str:
    """The licence of a diffusers folder from its README.md model card, or "unknown"."""
    card = Path(folder) / "README.md"
    try:
        return card_licence(card.read_text(encoding="utf-8")) if card.is_file() else UNKNOWN
    except (OSError, UnicodeDecodeError):
        return UNKNOWN


def safetensors_licence(path: Path) -> str:
    """`modelspec.license` from a .safetensors header, or "unknown"."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100 * 2**20:
                return UNKNOWN
            meta = json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return UNKNOWN
    return str(meta.get("modelspec.license") or UNKNOWN)


def checkpoint_licence(path: Path) -> str:
    """The licence a single-file checkpoint declares (.safetensors model spec), else its folder's model card."""
    path = Path(path)
    found = safetensors_licence(path) if path.suffix.lower() == ".safetensors" else UNKNOWN
    return found if found != UNKNOWN else folder_licence(path.parent)
