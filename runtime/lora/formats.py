"""LoRA files -> low-rank layers: kohya/sd-scripts (`lora_unet_*.lora_down/lora_up/alpha`) and diffusers/PEFT
(`unet.*.lora_A/lora_B`, alpha from the `lora_adapter_metadata` header), read with safetensors' NumPy API.

References: kohya-ss/sd-scripts networks/lora.py (names, alpha / rank scaling, LoCon conv layers), diffusers
loaders/lora_conversion_utils.py and lora_base.py (PEFT keys, adapter metadata), PEFT's LoraConfig.
Pickled checkpoints (.ckpt/.pt/.bin) are refused: loading them can run arbitrary code.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

PICKLES = (".ckpt", ".pt", ".pth", ".bin")
KOHYA = (".lora_down.weight", ".lora_up.weight", ".alpha")
PEFT = (".lora_A.weight", ".lora_B.weight")
OLD_DIFFUSERS = (".lora.down.weight", ".lora.up.weight")            # diffusers' pre-PEFT LoRA layers
UNSUPPORTED = {"hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "lora_mid": "LoCon with a Tucker core",
               "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff_b": "bias-difference"}


@dataclass(frozen=True)
class Layer:
    """One low-rank update, named as in the file: delta = (alpha / rank) * up @ down."""
    key: str                         # the file's layer name: `lora_unet_..._to_q` or `unet.down_blocks....to_q`
    down: np.ndarray                 # (r, in) linear, (r, in, kh, kw) conv
    up: np.ndarray                   # (out, r) linear, (out, r, 1, 1) conv
    alpha: float

    @property
    def rank(self) -> int:
        """The update's rank r."""
        return int(self.down.shape[0])

    def delta(self, scale: float) -> np.ndarray:
        """scale * (alpha / r) * up @ down in the weight's own layout: (out, in) or (out, in, kh, kw), float32."""
        up = self.up.reshape(self.up.shape[0], -1).astype(np.float32)           # (out, r)
        down = self.down.reshape(self.rank, -1).astype(np.float32)               # (r, in * kh * kw)
        d = (np.float32(scale * self.alpha / self.rank) * up) @ down
        return d.reshape((self.up.shape[0],) + self.down.shape[1:])


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file's layers and what it says about itself."""
    path: Path
    format: str                      # kohya | peft
    layers: tuple                    # Layer, in file order
    metadata: dict

    @property
    def name(self) -> str:
        """The file name without extension, as A1111's `<lora:name:w>` tags name it."""
        return self.path.stem


def read_tensors(path: Path) -> tuple[dict, dict]:
    """(name -> array, metadata) of a .safetensors file; bf16 tensors are widened to float32."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLES:
        raise UserError(f"{path}: pickled checkpoints ({path.suffix}) can run code when loaded and are refused; "
                        "convert it to .safetensors")
    if not path.is_file():
        raise UserError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
            tensors = {n: _tensor(f, path, n) for n in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None
    return tensors, metadata


def _tensor(f, path: Path, name: str) -> np.ndarray:
    """One tensor through the NumPy API, or (bf16, which NumPy lacks) from the raw bytes."""
    try:
        return f.get_tensor(name)
    except TypeError:
        return _bf16(path, name)


def _bf16(path: Path, name: str) -> np.ndarray:
    """A BF16 tensor as float32: the header's byte range, each value's 16 bits moved to the top of a float32."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        info = json.loads(fh.read(n))[name]
        if info["dtype"] != "BF16":
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        fh.seek(8 + n + a)
        raw = np.frombuffer(fh.read(b - a), dtype=np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def load_lora(path: Path) -> LoraFile:
    """Read a LoRA file in kohya or PEFT format into its layers."""
    tensors, metadata = read_tensors(path)
    for marker, what in UNSUPPORTED.items():
        if any(marker in k for k in tensors):
            raise UserError(f"{path}: {what} weights are not supported (only LoRA / LoCon up-down pairs)")
    if any(k.endswith(KOHYA[0]) for k in tensors):
        return LoraFile(Path(path), "kohya", _pairs(path, tensors, KOHYA, {}), metadata)
    if any(k.endswith(PEFT[0]) or k.endswith(OLD_DIFFUSERS[0]) for k in tensors):
        suffixes = PEFT if any(k.endswith(PEFT[0]) for k in tensors) else OLD_DIFFUSERS
        return LoraFile(Path(path), "peft", _pairs(path, tensors, suffixes + (".alpha",), metadata), metadata)
    raise UserError(f"{path}: no LoRA weights found (expected kohya `.lora_down.weight` or PEFT `.lora_A.weight` "
                    f"keys; first keys: {', '.join(list(tensors)[:3]) or 'none'})")


def _pairs(path: Path, tensors: dict, suffixes: tuple, metadata: dict) -> tuple:
    """Layers from down/up(/alpha) keys; every tensor must belong to one, with matching ranks."""
    down_s, up_s, alpha_s = suffixes
    layers, used = [], set()
    for key in [k for k in tensors if k.endswith(down_s)]:
        base = key[:-len(down_s)]
        if base + up_s not in tensors:
            raise UserError(f"{path}: {key} has no matching {base + up_s}")
        down, up = tensors[key], tensors[base + up_s]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise UserError(f"{path}: {base}: down {list(down.shape)} and up {list(up.shape)} do not form a "
                            "low-rank pair")
        alpha = _alpha(tensors, base + alpha_s, metadata, base, down.shape[0])
        layers.append(Layer(base, down, up, alpha))
        used |= {key, base + up_s, base + alpha_s}
    stray = [k for k in tensors if k not in used]
    if stray:
        raise UserError(f"{path}: {len(stray)} tensors belong to no LoRA layer: {', '.join(stray[:3])}")
    return tuple(layers)


def _alpha(tensors: dict, key: str, metadata: dict, base: str, rank: int) -> float:
    """A layer's alpha: its `.alpha` tensor, else PEFT adapter metadata (lora_alpha / alpha_pattern), else rank."""
    if key in tensors:
        return float(np.asarray(tensors[key], dtype=np.float64).reshape(-1)[0])
    config = _adapter_config(metadata, base)
    if not config:
        return float(rank)
    module = base.split(".", 1)[1] if "." in base else base
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(config.get("lora_alpha", rank))


def _adapter_config(metadata: dict, base: str) -> dict:
    """The PEFT LoraConfig a diffusers-saved file records for this layer's component (`unet.lora_alpha`, ...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    component = base.split(".", 1)[0]
    prefixed = {k[len(component) + 1:]: v for k, v in data.items() if k.startswith(component + ".")}
    return prefixed or data
