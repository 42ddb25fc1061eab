"""What converting an original checkpoint into diffusers folders shares: key selection, shape checks, saving."""
from __future__ import annotations

import json
import re
from pathlib import Path


class Mismatch(Exception):
    """Converted weights that do not fit the derived config."""


def with_text_model_prefix(weights: dict) -> dict:
    """CLIP text-model weights in the `text_model.`-prefixed layout real SD repos (and kohya LoRA names) use."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in weights.items()}


def strip(checkpoint: dict, prefix: str) -> dict:
    """The tensors under prefix, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}


def only(checkpoint: dict, prefix: str) -> dict:
    """The tensors under prefix, keys unchanged."""
    return {k: v for k, v in checkpoint.items() if k.startswith(prefix)}


def count(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix<N>.` the keys have."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def save_component(folder: Path, cfg: dict, weights: dict, filename: str, build, name: str) -> None:
    """Check the weights against a meta-device model of cfg, then write config.json and safetensors."""
    from safetensors.torch import save_file

    _check_fit(weights, _expected_shapes(build), name)
    folder.mkdir(parents=True)
    write_json(folder / "config.json", cfg)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / filename), metadata={"format": "pt"})


def _expected_shapes(build) -> dict:
    """Parameter and buffer shapes of the model build() makes, without allocating its weights."""
    import torch

    from .cache import quiet_libraries

    quiet_libraries()
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _check_fit(weights: dict, expected: dict, name: str) -> None:
    """Raise _Mismatch naming the first missing, unexpected or mis-shaped tensors."""
    expected = {k.removeprefix("text_model."): v for k, v in expected.items()}   # CLIPTextModel is flat
    have = {k.removeprefix("text_model."): tuple(v.shape) for k, v in weights.items()}
    problems = []
    for label, keys in (("missing keys", expected.keys() - have.keys()),
                        ("unexpected keys", have.keys() - expected.keys()),
                        ("wrong shapes", {k for k in expected.keys() & have.keys() if expected[k] != have[k]})):
        if keys:
            problems.append(f"{label} {', '.join(sorted(keys)[:3])}{'...' if len(keys) > 3 else ''}")
    if problems:
        raise Mismatch(f"{name} weights do not fit the layout derived from the checkpoint ({'; '.join(problems)})")


def write_json(path: Path, data: dict) -> None:
    """Indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
