"""Text conditioning per model family: what the UNet gets besides the latents.

References: diffusers StableDiffusionPipeline.encode_prompt (last hidden state), StableDiffusionXLPipeline
.encode_prompt / _get_add_time_ids (penultimate states of both encoders, pooled projection, size/crop ids,
zeroed negatives), LatentConsistencyModelPipeline.get_guidance_scale_embedding (LCM, Luo et al. 2023); AUTOMATIC1111's
sd_hijack_clip.py forward (syntax "a1111": weighted 75-token chunks, see runtime.a1111) and
sd_samplers_cfg_denoiser.py (cond and uncond of different lengths go through the UNet in separate calls) and
sd_models_xl.py get_learned_conditioning (SDXL: an empty negative prompt is zeros, force_zero_negative_prompt).
CLIP skip N (A1111's "Clip skip", sd_hijack_clip.py encode_with_transformers; diffusers' clip_skip = N - 1):
final_layer_norm(hidden_states[-N]), which the exported graph gives as `normed_hidden_states.{L + 1 - N}`. diffusers
applies it to the prompt only (its negative prompt keeps the last layer), A1111 to both; SDXL's penultimate
states ignore it, as A1111 does by default (sdxl_clip_l_skip off).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import a1111
from .errors import UserError
from .layout import TEXT_ENCODERS

NORMED_STATES = "normed_hidden_states"     # text encoder outputs `normed_hidden_states.{i}`: layer i's states through
                                           # the final LayerNorm, i = 1 .. L-1 (SD 1.x/2.x exports, for CLIP skip)


@dataclass(frozen=True)
class Conditioning:
    """UNet conditioning for one request: text states and extra named inputs, batch-aligned (2B with guidance)."""
    embeds: np.ndarray                              # (B or 2B, S, D); with negative_embeds: the cond half (B, S, D)
    extra: dict = field(default_factory=dict)       # e.g. text_embeds (., P), time_ids (., 6): all passes, 2B
    negative_embeds: np.ndarray | None = None       # (B, S', D) when S' != S: uncond and cond UNet calls run apart

    def passes(self) -> list:
        """UNet feeds per call: one batched call, or (A1111, lengths differ) uncond then cond in two calls."""
        if self.negative_embeds is None:
            return [{"encoder_hidden_states": self.embeds} | self.extra]
        b = len(self.embeds)
        return [{"encoder_hidden_states": e} | {k: v[i * b:(i + 1) * b] for k, v in self.extra.items()}
                for i, e in enumerate((self.negative_embeds, self.embeds))]


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of (guidance - 1) * 1000, as LCM's UNets take it: (B, dim) float32."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -(np.float32(np.log(10000.0)) / (half - 1)))
    emb = (w.astype(np.float32) * 1000.0)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


def _run_encoder(model, encoder: str, ids: np.ndarray, states: str) -> tuple:
    """(states, pooled) of one text encoder on (N, 77) ids: the named states output and the pooled output."""
    graph = model.graph(encoder)
    out = graph(input_ids=graph.cast("input_ids", ids))                # int64 ids; Optimum may declare int32
    return out[states], out.get("text_embeds", out.get("pooler_output"))


def encoder_layers(model, encoder: str) -> int | None:
    """The text encoder's transformer layer count, from its config.json (None when the folder has none)."""
    path = model.folder / encoder / "config.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def states_output(model, encoder: str, penultimate: bool, clip_skip: int = 1) -> str:
    """The output whose states the UNet gets: SDXL's penultimate raw states, else the last layer's, or with CLIP
    skip N > 1 layer L + 1 - N's states through the final LayerNorm; one-line errors for N out of range."""
    names = model.graph(encoder).output_names
    if penultimate:
        layers = sum(1 for n in names if n.startswith("hidden_states."))     # embeddings + each layer
        return f"hidden_states.{layers - 2}"
    if clip_skip == 1:
        return "last_hidden_state"
    normed = [n for n in names if n.startswith(NORMED_STATES + ".")]
    layers = encoder_layers(model, encoder) or (len(normed) + 1 if normed else None)
    if layers is not None and clip_skip > layers:
        raise UserError(f"clip skip {clip_skip} is more than the {layers} layers of {encoder} (use 1 to {layers})")
    name = f"{NORMED_STATES}.{layers + 1 - clip_skip}" if layers else None
    if name not in names:
        raise UserError(f"{model.folder.name}/{encoder} has no CLIP skip outputs (exported before clip skip "
                        "support, or not by sdexport); re-export it with `sdexport convert` to use clip skip > 1")
    return name


def _encode_plain(model, encoder: str, tokenizer, texts: list, states: str) -> tuple:
    """diffusers' encode_prompt for one encoder: texts truncated to 77 ids (with a warning)."""
    return _run_encoder(model, encoder, tokenizer(texts), states)


def _encode_a1111(model, encoder: str, tokenizer, texts: list, states: str) -> tuple:
    """A1111's forward for one encoder: weighted 77-id chunks, emphasis per chunk, states (N, 77 * n, D)."""
    from .embeddings import chunk_tokenizer            # finds textual-inversion embeddings as A1111 does

    tok = chunk_tokenizer(tokenizer)
    chunks = [a1111.tokenize_line(text, tok).chunks for text in texts]
    return a1111.encode_a1111(lambda ids: _run_encoder(model, encoder, ids, states), chunks, a1111.empty_chunk(tok))


ENCODERS = {"plain": _encode_plain, "a1111": _encode_a1111}        # prompt syntax -> one encoder's encoding


def _encode_all(model, texts: list, syntax: str = "plain", clip_skip: int = 1) -> tuple:
    """States of every text encoder the model has, concatenated on features, and the last encoder's pool."""
    present = [(e, t) for e, t in TEXT_ENCODERS if model.has(e)]
    penultimate = "time_ids" in model.graph("unet").inputs       # SDXL family: penultimate layer's states
    parts = [ENCODERS[syntax](model, e, model.tokenizers[t], texts, states_output(model, e, penultimate, clip_skip))
             for e, t in present]
    if len({p[0].shape[1] for p in parts}) > 1:
        raise UserError("the text encoders' tokenizers split this prompt into different chunk counts")
    states = np.concatenate([p[0] for p in parts], axis=-1)
    _check_sequence(model, states.shape[1])
    return states, parts[-1][1]


def _check_sequence(model, length: int) -> None:
    """Refuse text states longer than the folder's exported sequence range (TensorRT engines have a maximum)."""
    ranges = model.manifest.shape_ranges if model.manifest else {}
    if "sequence" in ranges and length > ranges["sequence"][2]:
        top = ranges["sequence"][2]
        raise UserError(f"the prompt needs {length // 77} chunks of 77 tokens ({length}); this model was exported for "
                        f"at most {top // 77} ({top}): shorten it, or re-export with a wider shapes.sequence range")


def _clip_skip_for(model, clip_skip: int) -> int:
    """The CLIP skip that applies: SDXL-family models ignore it with a warning, as A1111 ignores it for them."""
    if clip_skip > 1 and "time_ids" in model.graph("unet").inputs:
        warnings.warn(f"clip skip {clip_skip} is ignored: SDXL-family models use their penultimate layer, as "
                      "AUTOMATIC1111 does", UserWarning, stacklevel=3)
        return 1
    return clip_skip


def encode(model, prompts: list, negative_prompt, per_prompt: int, height: int, width: int,
           guidance: float, syntax: str = "plain", clip_skip: int = 1) -> Conditioning:
    """Everything the UNet needs besides latents and timestep, negative half first when guidance is on."""
    clip_skip = _clip_skip_for(model, clip_skip)
    states, pooled = _encode_all(model, prompts, syntax, clip_skip)
    states, pooled = np.repeat(states, per_prompt, axis=0), np.repeat(pooled, per_prompt, axis=0)  # (B, S, D)
    extra, negative_ids, apart = {}, None, None
    unet = model.graph("unet")
    if "time_ids" in unet.inputs:
        ids, negative_ids = time_ids(unet.inputs["time_ids"].shape[1], height, width)
        extra = {"text_embeds": pooled, "time_ids": np.repeat(ids, len(states), axis=0)}
    if uses_guidance(model, guidance):
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if negatives is not None and len(negatives) != len(prompts):
            raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        empty = negatives is None or (syntax == "a1111" and all(n == "" for n in negatives))   # A1111 zeroes ""
        if empty and model.facts.force_zeros_for_empty_prompt:
            neg_states, neg_pooled = np.zeros_like(states), np.zeros_like(pooled)
        else:
            negative_skip = clip_skip if syntax == "a1111" else 1          # diffusers: the prompt only
            neg_states, neg_pooled = _encode_all(model, negatives or [""] * len(prompts), syntax, negative_skip)
            neg_states, neg_pooled = np.repeat(neg_states, per_prompt, 0), np.repeat(neg_pooled, per_prompt, 0)
        negative_extra = extra | ({"text_embeds": neg_pooled, "time_ids": np.repeat(negative_ids, len(states), 0)}
                                  if extra else {})
        extra = {k: np.concatenate([negative_extra[k], v]) for k, v in extra.items()}
        if neg_states.shape[1] == states.shape[1]:
            states = np.concatenate([neg_states, states])                                 # (2B, S, D)
        else:
            apart = neg_states.astype(np.float32)                                         # (B, S', D)
    if "timestep_cond" in unet.inputs:
        w = np.full((len(states),), guidance - 1.0, dtype=np.float32)
        extra["timestep_cond"] = guidance_embedding(w, unet.inputs["timestep_cond"].shape[1])
    return Conditioning(states.astype(np.float32), extra, apart)


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
