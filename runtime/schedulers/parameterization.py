"""Model parameterisation: from a UNet output to the denoised sample x0 and the noise eps.

A noise level is written x = alpha * x0 + sigma * eps. Variance-preserving schedulers
(DDPM, DDIM, DPM-Solver) have alpha² + sigma² = 1; the k-diffusion samplers (Euler,
Heun, LMS) use alpha = 1, sigma = k-diffusion sigma, and feed the UNet x / sqrt(1 + sigma²).
This module is the only place that knows what "epsilon", "v_prediction" and "sample" mean.

References:
- Ho, Jain, Abbeel 2020, DDPM (epsilon prediction, eq. 15 for x0).
- Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
  (v-prediction, sec. 4 and App. D).
- Saharia et al. 2022, Imagen (dynamic thresholding, sec. 2.3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class NoiseLevel:
    """Coefficients of x = alpha * x0 + sigma * eps at one step."""

    alpha: float
    sigma: float

    @classmethod
    def vp(cls, alpha_cumprod: float) -> "NoiseLevel":
        """Variance-preserving level of a discrete timestep: (sqrt(alpha_bar), sqrt(1 - alpha_bar))."""
        a = float(alpha_cumprod)
        return cls(math.sqrt(a), math.sqrt(1.0 - a))

    @classmethod
    def ve(cls, sigma: float) -> "NoiseLevel":
        """Variance-exploding (k-diffusion) level: x = x0 + sigma * eps."""
        return cls(1.0, float(sigma))

    @classmethod
    def vp_from_sigma(cls, sigma: float) -> "NoiseLevel":
        """VP level of a k-diffusion sigma: alpha = c_in(sigma), sigma_t = sigma * alpha."""
        alpha = c_in(sigma)
        return cls(alpha, float(sigma) * alpha)


def c_in(sigma: float) -> float:
    """1 / sqrt(sigma² + 1): the VP input scaling of a k-diffusion sigma (Karras 2022, Table 1 c_in)."""
    s = float(sigma)
    return 1.0 / math.sqrt(s * s + 1.0)


def predict(prediction_type: str, model_output: np.ndarray, sample: np.ndarray,
            level: NoiseLevel) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from an epsilon, v (Salimans & Ho 2022, App. D) or x0 ("sample") prediction."""
    a, s = level.alpha, level.sigma
    if prediction_type == "epsilon":
        return (sample - s * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / s
    if prediction_type == "v_prediction":
        norm = math.hypot(a, s)
        a_vp, s_vp, x_vp = a / norm, s / norm, sample / norm
        return a_vp * x_vp - s_vp * model_output, a_vp * model_output + s_vp * x_vp
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; "
                     f"use one of {', '.join(PREDICTION_TYPES)}")


def dynamic_threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Clip each sample to its `ratio` quantile of |x0| (at least 1) and rescale (Imagen, sec. 2.3)."""
    flat = x0.reshape(x0.shape[0], -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


def postprocess_x0(x0: np.ndarray, config) -> np.ndarray:
    """Dynamic thresholding, else clip_sample to [-clip_sample_range, clip_sample_range], else x0 as is."""
    if config.thresholding:
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return np.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0
