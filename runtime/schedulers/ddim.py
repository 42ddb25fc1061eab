"""Discrete-time VP samplers: DDIM and DDPM ancestral sampling.

References:
- Song, Meng, Ermon 2020, "Denoising Diffusion Implicit Models": update eq. 12, sigma_t(eta) eq. 16.
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models": posterior mean and
  variance eq. 6-7, sampling Algorithm 2.
"""
from __future__ import annotations

import math

from . import schedules
from .base import COMMON_DEFAULTS, Plan, Scheduler, check_range, draw

_DISCRETE_DEFAULTS = {**COMMON_DEFAULTS, "clip_sample": True, "thresholding": False,
                      "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
                      "sample_max_value": 1.0, "timestep_spacing": "leading",
                      "rescale_betas_zero_snr": False}


class DiscreteScheduler(Scheduler):
    """Integer timesteps on the training grid; the sample is never rescaled."""

    def _plan(self, n: int) -> Plan:
        cfg = self.config
        timesteps = schedules.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n,
                                               cfg.steps_offset)
        return Plan(schedules.readonly(check_range(timesteps, cfg)), None, 1.0, n)

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t, or the final alpha_bar for t < 0."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod()


class DDIM(DiscreteScheduler):
    """DDIM (Song 2020); deterministic for eta = 0."""

    diffusers_name = "DDIMScheduler"
    defaults = {**_DISCRETE_DEFAULTS, "set_alpha_to_one": True, "eta": 0.0}

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0

    def _update(self, plan, state, i, x, x0, eps, noise):
        """x' = sqrt(a') x0 + sqrt(1 - a' - s²) eps + s z, s = eta * sigma_t (Song 2020, eq. 12 and 16)."""
        t = int(plan.timesteps[i])
        prev_t = t - self.config.num_train_timesteps // plan.num_inference_steps
        a, a_prev = float(self.alphas_cumprod[t]), self.alpha_bar(prev_t)
        variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        std = self.config.eta * math.sqrt(variance)
        prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std ** 2) * eps
        if self.config.eta > 0:
            prev = prev + std * draw(noise, x.shape)
        return prev, state


class DDPM(DiscreteScheduler):
    """DDPM ancestral sampling (Ho 2020, Algorithm 2) on the spaced timesteps."""

    diffusers_name = "DDPMScheduler"
    defaults = {**_DISCRETE_DEFAULTS, "variance_type": "fixed_small"}
    variance_types = ("fixed_small", "fixed_small_log", "fixed_large")

    def _validate(self) -> None:
        super()._validate()
        if self.config.variance_type not in self.variance_types:
            raise ValueError(f"variance_type {self.config.variance_type!r} is not supported; "
                             f"use one of {', '.join(self.variance_types)}")

    @property
    def stochastic(self) -> bool:
        return True

    def final_alpha_cumprod(self) -> float:
        return 1.0

    def _update(self, plan, state, i, x, x0, eps, noise):
        """Posterior mean (Ho 2020, eq. 7) plus sqrt(variance) z while t > 0."""
        t = int(plan.timesteps[i])
        prev_t = int(plan.timesteps[i + 1]) if i + 1 < len(plan.timesteps) else -1
        a, a_prev = float(self.alphas_cumprod[t]), self.alpha_bar(prev_t)
        beta_t = 1 - a / a_prev
        prev = (math.sqrt(a_prev) * beta_t * x0 + math.sqrt(1 - beta_t) * (1 - a_prev) * x) / (1 - a)
        if t > 0:
            prev = prev + self._std(a, a_prev, beta_t) * draw(noise, x.shape)
        return prev, state

    def _std(self, a: float, a_prev: float, beta_t: float) -> float:
        """Noise std: posterior beta_tilde (fixed_small, eq. 7, floored at 1e-20) or beta_t (fixed_large)."""
        if self.config.variance_type == "fixed_large":
            return math.sqrt(beta_t)
        return math.sqrt(max((1 - a_prev) / (1 - a) * beta_t, 1e-20))
