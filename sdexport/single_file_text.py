"""Single-file checkpoints: their text encoders (transformers CLIP or OpenCLIP keys) as diffusers folders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from runtime.layout import TEXT_ENCODERS

from .checkpoint_io import count, only, save_component, strip, with_text_model_prefix


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: its diffusers folder, checkpoint prefix and key style."""
    folder: str
    prefix: str
    open_clip: bool              # OpenCLIP resblocks layout (else transformers CLIP keys under the prefix)
    drops_last_layer: bool = False   # SD 2.x runs OpenCLIP's penultimate layer: diffusers keeps one layer less


def write_text_encoder(checkpoint: dict, cfg: dict, text: TextEncoder, dest: Path) -> None:
    """Convert one text encoder (CLIP or OpenCLIP keys) into the family config `cfg`, save it and its tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .clip_vocab import write_clip_tokenizer

    if text.open_clip:
        sub = _open_clip_subset(checkpoint, text)
        cfg.update(open_clip_sizes(strip(sub, text.prefix), cfg, keep_projection=not text.drops_last_layer))
        weights = _convert_open_clip(sub, text.prefix, cfg["hidden_size"])
    else:
        weights = _convert_clip(checkpoint, text.prefix)
        cfg.update(clip_sizes(weights, cfg))
    cls = CLIPTextModelWithProjection if cfg["architectures"] == ["CLIPTextModelWithProjection"] else CLIPTextModel
    save_component(dest / text.folder, cfg, weights, "model.safetensors",
          lambda: cls(CLIPTextConfig.from_dict(cfg)), text.folder)
    write_clip_tokenizer(dest / dict(TEXT_ENCODERS)[text.folder], **({"pad_token": "!"} if text.open_clip else {}),
                         model_max_length=cfg["max_position_embeddings"])


def _open_clip_subset(checkpoint: dict, text: TextEncoder) -> dict:
    """The OpenCLIP tensors under the prefix, minus the last layer and projection SD 2.x never runs."""
    sub = only(checkpoint, text.prefix)
    if not text.drops_last_layer:
        return sub
    last = count(strip(sub, text.prefix), "transformer.resblocks.") - 1
    unused = (f"{text.prefix}transformer.resblocks.{last}.", f"{text.prefix}text_projection")
    return {k: v for k, v in sub.items() if not k.startswith(unused)}


def _convert_open_clip(sub: dict, prefix: str, hidden: int) -> dict:
    """diffusers' OpenCLIP -> transformers CLIP conversion (q/k/v split by the hidden size)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sizes = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))  # all it reads of the model
    return convert_open_clip_checkpoint(sizes, sub, prefix=prefix)


def _convert_clip(checkpoint: dict, prefix: str) -> dict:
    """diffusers' CLIP key conversion, normalised to the `text_model.`-prefixed layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    weights = convert_ldm_clip_checkpoint(only(checkpoint, prefix), remove_prefix=prefix)
    weights = with_text_model_prefix(weights)
    weights.pop("text_model.embeddings.position_ids", None)
    return weights


def clip_sizes(weights: dict, cfg: dict) -> dict:
    """Text encoder sizes from transformers-layout CLIP weights."""
    token = weights["text_model.embeddings.token_embedding.weight"]
    sizes = dict(vocab_size=token.shape[0], hidden_size=token.shape[1],
                 max_position_embeddings=weights["text_model.embeddings.position_embedding.weight"].shape[0],
                 num_hidden_layers=count(weights, "text_model.encoder.layers."),
                 intermediate_size=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    if "text_projection.weight" in weights:
        sizes["projection_dim"] = weights["text_projection.weight"].shape[0]
    return _heads(cfg, sizes["hidden_size"]) | sizes


def open_clip_sizes(sd: dict, cfg: dict, keep_projection: bool) -> dict:
    """Text encoder sizes from (un-prefixed) OpenCLIP weights."""
    token = sd["token_embedding.weight"]
    sizes = dict(vocab_size=token.shape[0], hidden_size=token.shape[1],
                 max_position_embeddings=sd["positional_embedding"].shape[0],
                 num_hidden_layers=count(sd, "transformer.resblocks."),
                 intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    if keep_projection and "text_projection" in sd:
        sizes["projection_dim"] = sd["text_projection"].shape[1]
    return _heads(cfg, sizes["hidden_size"]) | sizes


def _heads(cfg: dict, hidden: int) -> dict:
    """Heads (invisible in weights) for a non-standard width: 64-wide (8-wide if small); projection as wide."""
    if hidden == cfg["hidden_size"]:
        return {}
    return {"num_attention_heads": hidden // 64 if hidden % 64 == 0 else max(1, hidden // 8),
            "projection_dim": hidden}
