"""LoRA layer names -> (component, source module) of an exported model, as diffusers resolves them.

kohya names are the module path with `_` for `.` behind `lora_unet_`, `lora_te_`/`lora_te1_` (text_encoder) or
`lora_te2_` (text_encoder_2); SDXL files trained on the original (SGM/LDM) UNet say input_blocks / middle_block /
output_blocks and are renamed block by block as diffusers' `_maybe_map_sgm_blocks_to_diffusers` does.
PEFT names are `<component>.<module>`. References: diffusers loaders/lora_conversion_utils.py, sd-scripts lora.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
RESNET_LEAVES = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
                 ("skip_connection", "conv_shortcut"))
OUTSIDE_BLOCKS = (("time_embed_0", "time_embedding_linear_1"), ("time_embed_2", "time_embedding_linear_2"),
                  ("label_emb_0_0", "add_embedding_linear_1"), ("label_emb_0_2", "add_embedding_linear_2"),
                  ("out_2", "conv_out"), ("input_blocks_0_0", "conv_in"))


@dataclass(frozen=True)
class Target:
    """A LoRA layer placed on one weight of the model."""
    component: str                   # unet | text_encoder | text_encoder_2
    weight: str                      # the source weight's name, e.g. `down_blocks.0....attn1.to_q.weight`
    layer: object                    # runtime.lora.formats.Layer


def kohya_table(weight_names: dict) -> dict:
    """kohya layer name -> (component, weight name), from each component's source weight names."""
    table = {}
    for prefix, component in KOHYA_PREFIXES.items():
        for weight in weight_names.get(component, ()):
            table[prefix + weight[:-len(".weight")].replace(".", "_")] = (component, weight)
    return table


def sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """`input_blocks_4_1_transformer_blocks_0_attn1_to_q` -> `down_blocks_1_attentions_0_transformer_...`."""
    for sgm, diffusers in OUTSIDE_BLOCKS:
        if name == sgm or name.startswith(sgm + "_"):
            return diffusers + name[len(sgm):]
    n = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name):
        i, j, tail = int(m[1]), int(m[2]), m[3]
        if tail.startswith("op"):
            return f"down_blocks_{(i - 1) // n}_downsamplers_0_conv{tail[2:]}"
        return f"down_blocks_{(i - 1) // n}_{_inner(j, tail, (i - 1) % n)}"
    if m := re.fullmatch(r"middle_block_(\d+)_(.+)", name):
        inner = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(m[1]))
        return f"mid_block_{inner}_{_resnet_leaf(m[2])}" if inner else name
    if m := re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name):
        i, j, tail = int(m[1]), int(m[2]), m[3]
        if j >= 1 and tail.startswith("conv"):                       # the block's upsampler (after attention)
            return f"up_blocks_{i // n}_upsamplers_0_{tail}"
        return f"up_blocks_{i // n}_{_inner(j, tail, i % n)}"
    return name


def _inner(j: int, tail: str, layer: int) -> str:
    """An SGM block's part j (0: resnet, 1: attention) with the diffusers leaf names."""
    return f"resnets_{layer}_{_resnet_leaf(tail)}" if j == 0 else f"attentions_{layer}_{tail}"


def _resnet_leaf(tail: str) -> str:
    """SGM ResBlock leaf names -> diffusers ResnetBlock2D names."""
    for sgm, diffusers in RESNET_LEAVES:
        if tail == sgm:
            return diffusers
    return tail


def _kohya_target(key: str, table: dict, layers_per_block: int):
    """(component, weight) for a kohya layer name, or None."""
    if key in table:
        return table[key]
    if key.startswith("lora_unet_"):
        return table.get("lora_unet_" + sgm_to_diffusers(key[len("lora_unet_"):], layers_per_block))
    return None


def _peft_target(key: str, weight_names: dict):
    """(component, weight) for a PEFT layer name `<component>.<module>`, or None."""
    component, _, module = key.partition(".")
    names = weight_names.get(component, ())
    for candidate in (module, "text_model." + module):
        if candidate + ".weight" in names:
            return component, candidate + ".weight"
    return None


def resolve(lora, weight_names: dict, shapes: dict, layers_per_block: int, partial: bool = False) -> list:
    """Targets of every layer of a LoraFile; unknown names (unless `partial`) and wrong shapes are refused."""
    table = kohya_table(weight_names) if lora.format == "kohya" else None
    targets, missing = [], []
    for layer in lora.layers:
        found = (_kohya_target(layer.key, table, layers_per_block) if table is not None
                 else _peft_target(layer.key, weight_names))
        if found is None:
            missing.append(layer.key)
            continue
        if found[1] in shapes[found[0]]:                              # unmapped weights: merge explains
            _check_shape(lora, layer, found, shapes[found[0]][found[1]])
        targets.append(Target(found[0], found[1], layer))
    if missing and (not partial or not targets):
        hint = "" if targets else " (a LoRA for another model family, or for components this folder lacks?)"
        more = "; pass --lora-partial to apply the layers that match" if targets else ""
        raise UserError(f"{lora.path.name}: {len(missing)} of {len(lora.layers)} layers match no layer of this "
                        f"model{hint}: {', '.join(missing[:3])}{more}")
    return targets


def _check_shape(lora, layer, found: tuple, shape: list) -> None:
    """The update's shape must be the weight's: (out, in) or (out, in, kh, kw)."""
    got = (layer.up.shape[0],) + tuple(layer.down.shape[1:])
    want = tuple(shape)
    if len(want) == 4 and len(got) == 2:                              # linear LoRA on a 1x1 conv (proj_in/out)
        want = want[:2] if want[2:] == (1, 1) else want
    if tuple(got) != want:
        raise UserError(f"{lora.path.name}: layer {layer.key} is {list(got)} but {found[0]} "
                        f"{found[1][:-len('.weight')]} is {list(shape)} in this model (a LoRA for another "
                        "architecture, e.g. SDXL on SD 1.5?)")


def delta_for(target: Target, scale: float, shape: list) -> np.ndarray:
    """The target's update in the source weight's shape (a linear update on a 1x1 conv gains its 1x1 axes)."""
    d = target.layer.delta(scale)
    return d.reshape(shape) if d.size == int(np.prod(shape)) else d
