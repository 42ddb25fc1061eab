"""SD3 text conditioning: CLIP-L and CLIP-G penultimate states beside T5's, and the two pooled projections.

Reference: diffusers StableDiffusion3Pipeline.encode_prompt / _get_clip_prompt_embeds / _get_t5_prompt_embeds:
the CLIP states (B, 77, 768 + 1280) are zero-padded to T5's width and put before the T5 states (B, L, 4096) on
the sequence axis; without T5 its part is zeros of the transformer's joint_attention_dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .conditioning import _run_encoder, states_output
from .errors import UserError
from .layout import T5_ENCODER, TEXT_ENCODERS
from .t5_tokenizer import MAX_SEQUENCE_LENGTH

T5_LENGTH = 256                     # StableDiffusion3Pipeline's max_sequence_length default


def _texts(value, count: int, what: str) -> tuple | None:
    """None, or one text per prompt: a string applies to every prompt, a list must have one per prompt."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,) * count
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise UserError(f"{what} must be a string or a list of strings")
    if len(value) != count:
        raise UserError(f"{len(value)} {what}s for {count} prompts")
    return tuple(value)


@dataclass(frozen=True)
class SD3Prompts:
    """SD3's extra text inputs: prompts for CLIP-G (_2) and T5 (_3), their negatives, and T5's token count."""
    prompt_2: str | tuple | None = None      # None (or empty): the prompt, as diffusers
    prompt_3: str | tuple | None = None
    negative_prompt_2: str | tuple | None = None
    negative_prompt_3: str | tuple | None = None
    max_sequence_length: int = T5_LENGTH

    def __post_init__(self):
        """Lists become tuples; a bad max_sequence_length is refused in one line."""
        for name in ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        n = self.max_sequence_length
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_SEQUENCE_LENGTH:
            raise UserError(f"max_sequence_length must be an integer in [2, {MAX_SEQUENCE_LENGTH}], got {n!r}")


def _clip(model, index: int, texts: tuple) -> tuple:
    """(penultimate states (N, 77, D), projected pooled (N, P)) of CLIP encoder `index` (0: L, 1: G)."""
    encoder, tokenizer = TEXT_ENCODERS[index]
    ids = model.tokenizers[tokenizer](list(texts))
    return _run_encoder(model, encoder, ids, states_output(model, encoder, penultimate=True))


def _t5(model, texts: tuple, length: int, use_t5: bool, width: int) -> np.ndarray:
    """T5's last hidden states (N, length, D), or zeros of the transformer's text width without T5."""
    if not use_t5:
        return np.zeros((len(texts), length, width), np.float32)
    graph = model.graph(T5_ENCODER[0])
    ids = model.tokenizers[T5_ENCODER[1]](list(texts), length)
    return graph(input_ids=graph.cast("input_ids", ids))["last_hidden_state"]


def _encode(model, texts: tuple, texts_2: tuple, texts_3: tuple, length: int, use_t5: bool) -> tuple:
    """encode_prompt for one set of prompts: joint states (N, 77 + length, D) and pooled (N, P_L + P_G)."""
    width = model.graph("transformer").inputs["encoder_hidden_states"].shape[-1]
    (l_states, l_pooled), (g_states, g_pooled) = _clip(model, 0, texts), _clip(model, 1, texts_2)
    clip = np.concatenate([l_states, g_states], axis=-1)                                 # (N, 77, D_L + D_G)
    t5 = _t5(model, texts_3, length, use_t5, width)
    clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))          # (N, 77, D)
    return np.concatenate([clip, t5], axis=1), np.concatenate([l_pooled, g_pooled], axis=-1)


def encode_sd3(model, prompts: tuple, negative_prompt, p: SD3Prompts, per_prompt: int, guidance: bool,
               use_t5: bool) -> tuple:
    """(joint text states, pooled projections) for every transformer row, negative half first with guidance."""
    n = len(prompts)
    texts_2 = _texts(p.prompt_2 or None, n, "prompt_2") or prompts         # diffusers: `prompt_2 or prompt`
    texts_3 = _texts(p.prompt_3 or None, n, "prompt_3") or prompts
    states, pooled = _encode(model, prompts, texts_2, texts_3, p.max_sequence_length, use_t5)
    if guidance:
        neg = _texts(negative_prompt or "", n, "negative prompt")       # diffusers: "" when none is given
        neg_2 = _texts(p.negative_prompt_2 or None, n, "negative_prompt_2") or neg
        neg_3 = _texts(p.negative_prompt_3 or None, n, "negative_prompt_3") or neg
        neg_states, neg_pooled = _encode(model, neg, neg_2, neg_3, p.max_sequence_length, use_t5)
        states, pooled = np.concatenate([neg_states, states]), np.concatenate([neg_pooled, pooled])
    return (np.repeat(states, per_prompt, axis=0).astype(np.float32),          # (2B or B, 77 + L, D)
            np.repeat(pooled, per_prompt, axis=0).astype(np.float32))          # (2B or B, P)
