"""Test helper: a diffusers folder as one checkpoint in the original CompVis key layout.

The reverse of diffusers' single-file conversion, generalised from the mappings of diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py to any number of levels and layers per block.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_TOP = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
            ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
OPEN_CLIP = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"),
             ("text_model.final_layer_norm.", "ln_final."),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding")]


def unet_prefixes(cfg: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, CompVis prefix) for every UNet block."""
    per, levels = cfg["layers_per_block"] + 1, len(cfg["block_out_channels"])
    pairs = list(UNET_TOP) + [("mid_block.attentions.0.", "middle_block.1."),
                              ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(levels):
        for j in range(per - 1):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.")]
        for j in range(per):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1.")]
        if i < levels - 1:
            slot = 2 if cfg["up_block_types"][i].startswith("CrossAttn") else 1
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op."),
                      (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{slot}.")]
    return pairs


def vae_prefixes(cfg: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, CompVis prefix) for every VAE block."""
    per, levels = cfg["layers_per_block"], len(cfg["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(levels):
        up = levels - 1 - i
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(per)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.") for j in range(per + 1)]
        pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.")]
    return pairs


def rename(key: str, prefixes: list[tuple[str, str]], inner: dict[str, list]) -> str:
    """Swap the longest matching block prefix, then the inner names of that kind of block."""
    matches = [(hf, sd) for hf, sd in prefixes if key.startswith(hf)]
    if not matches:
        return key
    hf, sd = max(matches, key=lambda m: len(m[0]))
    rest = key[len(hf):]
    for kind, pairs in inner.items():
        if kind in hf:
            for old, new in pairs:
                rest = rest.replace(old, new)
    return sd + rest


def unet_to_ldm(weights: dict, cfg: dict) -> dict:
    """UNet weights in `model.diffusion_model.*` layout."""
    prefixes = unet_prefixes(cfg)
    return {"model.diffusion_model." + rename(k, prefixes, {"resnets": UNET_RESNET}): v for k, v in weights.items()}


def vae_to_ldm(weights: dict, cfg: dict) -> dict:
    """VAE weights in `first_stage_model.*` layout, attention projections as 1x1 convolutions."""
    prefixes = vae_prefixes(cfg)
    out = {}
    for k, v in weights.items():
        new = rename(k, prefixes, {"resnets": VAE_RESNET, "attentions": VAE_ATTN})
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new):
            v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(weights: dict, prefix: str) -> dict:
    """transformers CLIP weights under an SD 1.x / SDXL prefix."""
    return {prefix + k: v for k, v in weights.items()}


def open_clip_to_ldm(weights: dict, prefix: str, extra_layer: bool = False) -> dict:
    """transformers CLIP weights as OpenCLIP (fused q/k/v, transposed projection) under a prefix.

    extra_layer appends a final resblock (and projection) that SD 2.x checkpoints carry but never run."""
    out, fused = {}, {}
    for k, v in weights.items():
        m = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        else:
            out[_open_clip_name(k)] = v
    for (layer, kind), qkv in fused.items():
        out[f"{_open_clip_name(layer)}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    if extra_layer:
        _append_unused_layer(out, weights)
    return {prefix + k: v for k, v in out.items()}


def _open_clip_name(key: str) -> str:
    """OpenCLIP name of one transformers CLIP key."""
    for old, new in OPEN_CLIP:
        key = key.replace(old, new)
    return key


def _append_unused_layer(out: dict, weights: dict) -> None:
    """A copy of the last resblock, perturbed, at the next index, plus a text_projection."""
    last = max(int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks."))
    for k in [k for k in out if k.startswith(f"transformer.resblocks.{last}.")]:
        out[k.replace(f".{last}.", f".{last + 1}.", 1)] = out[k] + 1.0
    hidden = out["token_embedding.weight"].shape[1]
    out.setdefault("text_projection", torch.ones(hidden, hidden))


def read_folder(folder: Path, name: str) -> tuple[dict, dict]:
    """(weights, config) of one component folder."""
    folder = Path(folder) / name
    files = sorted(folder.glob("*.safetensors"))
    weights = load_file(str(files[0]))
    return weights, json.loads((folder / "config.json").read_text())


def text_weights(folder: Path, name: str) -> dict:
    """A text encoder's weights in the `text_model.`-prefixed layout."""
    weights, _ = read_folder(folder, name)
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in weights.items()}


def folder_to_ldm(folder: Path, family: str) -> dict:
    """One state dict of a diffusers folder in the family's original single-file layout."""
    unet, unet_cfg = read_folder(folder, "unet")
    vae, vae_cfg = read_folder(folder, "vae")
    sd = unet_to_ldm(unet, unet_cfg) | vae_to_ldm(vae, vae_cfg)
    if family == "sd1":
        sd |= clip_to_ldm(text_weights(folder, "text_encoder"), "cond_stage_model.transformer.")
    elif family == "sd2":
        sd |= open_clip_to_ldm(text_weights(folder, "text_encoder"), "cond_stage_model.model.", extra_layer=True)
    elif family == "sdxl_base":
        sd |= clip_to_ldm(text_weights(folder, "text_encoder"), "conditioner.embedders.0.transformer.")
        sd |= open_clip_to_ldm(text_weights(folder, "text_encoder_2"), "conditioner.embedders.1.model.")
    else:
        raise ValueError(family)
    return sd


def write_checkpoint(sd: dict, path: Path) -> Path:
    """Save as .safetensors, or as a .ckpt holding {"state_dict": ...}."""
    path = Path(path)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 0}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
