"""A1111's extra-network prompt tags: `<lora:name:0.8>` taken out of the prompt text before it is encoded.

Reference: AUTOMATIC1111 modules/extra_networks.py (`<(\\w+):([^>]+)>`, arguments split on ':', every tag removed
from every prompt, the first prompt's tags used for the batch) and extensions-builtin/Lora/extra_networks_lora.py
(`<lora:name:te[:unet]>`, te defaults to 1.0, unet to te; named `te=` / `unet=`).
"""
from __future__ import annotations

import re
import warnings

from ..errors import UserError

RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
LORA_TYPES = ("lora", "lyco")


def parse_prompt(prompt: str) -> tuple[str, list]:
    """(prompt without tags, [(type, [args])]) as A1111's parse_prompt."""
    found = []

    def take(m):
        found.append((m.group(1), m.group(2).split(":")))
        return ""

    return RE_EXTRA_NET.sub(take, prompt), found


def _number(text: str, tag: str) -> float:
    """A tag's multiplier."""
    try:
        return float(text)
    except ValueError:
        raise UserError(f"prompt tag <{tag}>: the weight must be a number, got {text!r}") from None


def lora_from_tag(args: list, tag: str):
    """(name, weight) for `<lora:name:te[:unet]>`: weight is one number, or (te, unet) when they differ."""
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    if not positional or not positional[0].strip():
        raise UserError(f"prompt tag <{tag}>: no LoRA name")
    te = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = _number(named.get("unet", positional[2] if len(positional) > 2 else str(te)), tag)
    return positional[0].strip(), te if te == unet else (te, unet)


def take_lora_tags(prompts) -> tuple[tuple, tuple]:
    """(prompts without extra-network tags, ((name, weight), ...) from the first prompt's lora tags)."""
    stripped, first = [], None
    for prompt in prompts:
        text, tags = parse_prompt(prompt)
        stripped.append(text)
        first = tags if first is None else first
    loras = []
    for kind, args in first or []:
        tag = f"{kind}:{':'.join(args)}"
        if kind in LORA_TYPES:
            loras.append(lora_from_tag(args, tag))
        else:
            warnings.warn(f"prompt tag <{tag}>: extra network type {kind!r} is not supported; removed from the prompt")
    return tuple(stripped), tuple(loras)
