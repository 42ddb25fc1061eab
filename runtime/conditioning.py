"""Text conditioning per model family: what the UNet gets besides the latents.

References: diffusers StableDiffusionPipeline.encode_prompt (last hidden state), StableDiffusionXLPipeline
.encode_prompt / _get_add_time_ids (penultimate states of both encoders, pooled projection, size/crop ids,
zeroed negatives), LatentConsistencyModelPipeline.get_guidance_scale_embedding (LCM, Luo et al. 2023).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .layout import TEXT_ENCODERS


@dataclass(frozen=True)
class Conditioning:
    """UNet conditioning for one request: text states and extra named inputs, batch-aligned (2B with guidance)."""
    embeds: np.ndarray                              # (B or 2B, S, D)
    extra: dict = field(default_factory=dict)       # e.g. text_embeds (., P), time_ids (., 6), timestep_cond


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of (guidance - 1) * 1000, as LCM's UNets take it: (B, dim) float32."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -(np.float32(np.log(10000.0)) / (half - 1)))
    emb = (w.astype(np.float32) * 1000.0)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


def _encode(model, encoder: str, tokenizer, texts: list, penultimate: bool) -> tuple:
    """(states, pooled) of one text encoder: last (or penultimate) hidden states and its pooled output."""
    graph = model.graph(encoder)
    out = graph(input_ids=graph.cast("input_ids", tokenizer(texts)))       # int64 ids; Optimum may declare int32
    pooled = out.get("text_embeds", out.get("pooler_output"))
    if not penultimate:
        return out["last_hidden_state"], pooled
    layers = sum(1 for n in out if n.startswith("hidden_states."))     # embeddings + each layer
    return out[f"hidden_states.{layers - 2}"], pooled


def _encode_all(model, texts: list) -> tuple:
    """States of every text encoder the model has, concatenated on features, and the last encoder's pool."""
    present = [(e, t) for e, t in TEXT_ENCODERS if model.has(e)]
    penultimate = "time_ids" in model.graph("unet").inputs       # SDXL family: penultimate layer's states
    parts = [_encode(model, e, model.tokenizers[t], texts, penultimate) for e, t in present]
    return np.concatenate([p[0] for p in parts], axis=-1), parts[-1][1]


def encode(model, prompts: list, negative_prompt, per_prompt: int, height: int, width: int,
           guidance: float) -> Conditioning:
    """Everything the UNet needs besides latents and timestep, negative half first when guidance is on."""
    from .errors import UserError

    states, pooled = _encode_all(model, prompts)
    states, pooled = np.repeat(states, per_prompt, axis=0), np.repeat(pooled, per_prompt, axis=0)  # (B, S, D)
    extra, negative_ids = {}, None
    unet = model.graph("unet")
    if "time_ids" in unet.inputs:
        ids, negative_ids = time_ids(unet.inputs["time_ids"].shape[1], height, width)
        extra = {"text_embeds": pooled, "time_ids": np.repeat(ids, len(states), axis=0)}
    if uses_guidance(model, guidance):
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if negatives is not None and len(negatives) != len(prompts):
            raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if negatives is None and model.facts.force_zeros_for_empty_prompt:
            neg_states, neg_pooled = np.zeros_like(states), np.zeros_like(pooled)
        else:
            neg_states, neg_pooled = _encode_all(model, negatives or [""] * len(prompts))
            neg_states, neg_pooled = np.repeat(neg_states, per_prompt, 0), np.repeat(neg_pooled, per_prompt, 0)
        negative_extra = extra | ({"text_embeds": neg_pooled, "time_ids": np.repeat(negative_ids, len(states), 0)}
                                  if extra else {})
        states = np.concatenate([neg_states, states])                                     # (2B, S, D)
        extra = {k: np.concatenate([negative_extra[k], v]) for k, v in extra.items()}
    if "timestep_cond" in unet.inputs:
        w = np.full((len(states),), guidance - 1.0, dtype=np.float32)
        extra["timestep_cond"] = guidance_embedding(w, unet.inputs["timestep_cond"].shape[1])
    return Conditioning(states.astype(np.float32), extra)


def time_ids(n: int, height: int, width: int) -> tuple:
    """SDXL micro-conditioning (positive, negative): original size, crop, then target size (base, 6 ids) or
    aesthetic score 6.0 / 2.5 (refiner, 5 ids), as diffusers' _get_add_time_ids defaults."""
    head = [height, width, 0, 0]
    if n == 5:
        return np.array([head + [6.0]], np.float32), np.array([head + [2.5]], np.float32)
    ids = np.array([head + [height, width]], np.float32)
    return ids, ids


def uses_guidance(model, guidance: float) -> bool:
    """Classifier-free guidance runs when guidance > 1, except for guidance-embedding (LCM) UNets."""
    return guidance > 1.0 and "timestep_cond" not in model.graph("unet").inputs
