"""A1111 emphasis and multi-chunk encoding: weighted chunks -> text-encoder states (B, 77 * n, D).

References (AUTOMATIC1111/stable-diffusion-webui):
- modules/sd_emphasis.py, EmphasisOriginal.after_transformers: z *= multipliers, then z is rescaled so its
  mean equals the mean before weighting. A1111 takes that mean over the whole batch it encodes at once
  (one prompt's prompt-editing variants); here it is taken per row, which is the same for one prompt and
  keeps every prompt independent of what it is batched with.
- modules/sd_hijack_clip.py, forward: prompts of one batch are padded with empty_chunk to the same chunk
  count, every chunk index is encoded as one (B, 77) batch, the states are concatenated on the sequence
  axis (torch.hstack) and the pooled output comes from the first chunk (zs[0].pooled, SDXL).
- modules/sd_samplers_cfg_denoiser.py, CFGDenoiser.forward: when cond and uncond differ in chunk count,
  A1111 by default (both pad options off) runs the UNet on cond and on uncond in separate calls; option
  pad_cond_uncond pads the shorter with the empty prompt's states (pad_cond_uncond here), option
  pad_cond_uncond_v0 repeats uncond's last vector or truncates it. chunk_count lets the pipeline choose.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .chunking import PromptChunk

CHUNK_TOKENS = 77                   # ids per encoder row: bos, 75 content, eos

EncoderFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]   # (N, 77) int64 -> states, pooled


def apply_emphasis(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """EmphasisOriginal per row: z * weights, rescaled to z's original mean; (B, 77, D), (B, 77) -> float32."""
    z = np.asarray(z, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    before = z.mean(axis=(1, 2), dtype=np.float64, keepdims=True)         # (B, 1, 1)
    weighted = z * weights[:, :, None]                                    # (B, 77, D)
    after = weighted.mean(axis=(1, 2), dtype=np.float64, keepdims=True)
    return (weighted * (before / after)).astype(np.float32)


def encode_a1111(encode: EncoderFn, prompts: Sequence[Sequence[PromptChunk]],
                 empty: PromptChunk | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A1111's forward: B prompts' chunks (short ones padded with empty) -> states (B, 77 * n, D), first pooled."""
    n = max(len(chunks) for chunks in prompts)
    if empty is None and any(len(chunks) != n for chunks in prompts):
        raise ValueError("prompts with different chunk counts need the empty chunk to pad with")
    states, pools = [], []
    for i in range(n):
        rows = [chunks[i] if i < len(chunks) else empty for chunks in prompts]
        z, pooled = encode(np.array([row.ids for row in rows], dtype=np.int64))   # (B, 77) -> (B, 77, D), (B, P)
        states.append(apply_emphasis(z, np.array([row.weights for row in rows])))
        pools.append(pooled)
    return np.concatenate(states, axis=1), pools[0]                             # (B, 77 * n, D)


def chunk_count(states: np.ndarray) -> int:
    """Chunks in states (B, 77 * n, D); cond/uncond counts that differ: A1111 runs them apart, or pads."""
    return states.shape[1] // CHUNK_TOKENS


def pad_cond_uncond(cond: np.ndarray, uncond: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A1111's pad_cond_uncond option: the shorter of cond/uncond gets the empty prompt's (1, 77, D) repeated."""
    repeats = chunk_count(cond) - chunk_count(uncond)

    def pad(states: np.ndarray, times: int) -> np.ndarray:
        return np.concatenate([states, np.tile(empty, (len(states), times, 1))], axis=1)

    if repeats > 0:
        return cond, pad(uncond, repeats)
    return (pad(cond, -repeats), uncond) if repeats < 0 else (cond, uncond)
