"""Consistency-distilled samplers: Latent Consistency Model and Trajectory Consistency Distillation.

References:
- Luo, Tan, Huang, Li, Zhao 2023, "Latent Consistency Models": multistep sampling, Algorithm 1;
  skipping-step schedule over original_inference_steps (sec. 4.3).
- Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models": boundary condition
  c_skip = sigma_data² / (t² + sigma_data²), c_out = t / sqrt(t² + sigma_data²) (sec. 3, App. C).
- Zheng et al. 2024, "Trajectory Consistency Distillation": strategic stochastic sampling,
  Algorithm 4 (gamma = eta: denoise to s = floor((1 - gamma) t'), re-noise to t').
"""
from __future__ import annotations

import math

import numpy as np

from . import schedules
from .base import COMMON_DEFAULTS, Plan, Scheduler, draw

F32 = np.float32

SIGMA_DATA = 0.5


class LCM(Scheduler):
    """LCM as diffusers' LCMScheduler: denoise with the consistency function, then re-noise to the next step."""

    diffusers_name = "LCMScheduler"
    defaults = {**COMMON_DEFAULTS, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "original_inference_steps": 50, "clip_sample": False,
                "clip_sample_range": 1.0, "set_alpha_to_one": True, "thresholding": False,
                "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
                "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False}

    @property
    def stochastic(self) -> bool:
        return True

    def _plan(self, n: int) -> Plan:
        """n of the original_inference_steps LCM timesteps k*j - 1, evenly skipped (Luo 2023, sec. 4.3)."""
        cfg = self.config
        original = cfg.original_inference_steps
        if original > cfg.num_train_timesteps:
            raise ValueError(f"original_inference_steps ({original}) cannot exceed num_train_timesteps "
                             f"({cfg.num_train_timesteps})")
        if n > original:
            raise ValueError(f"LCM supports at most original_inference_steps ({original}) steps, got {n}")
        k = cfg.num_train_timesteps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        timesteps = origin[picks].astype(np.float64)
        return Plan(schedules.readonly(timesteps), None, 1.0, n)

    def boundary_scalings(self, t: int) -> tuple[float, float]:
        """(c_skip, c_out) at scaled time t * timestep_scaling (Song 2023, consistency boundary condition)."""
        scaled = t * self.config.timestep_scaling
        c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
        c_out = scaled / math.sqrt(scaled ** 2 + SIGMA_DATA ** 2)
        return c_skip, c_out

    def _update(self, plan, state, i, x, x0, eps, noise):
        """denoised = c_out x0 + c_skip x; x' = sqrt(a') denoised + sqrt(1 - a') z except at the last step."""
        t = int(plan.timesteps[i])
        c_skip, c_out = self.boundary_scalings(t)
        denoised = c_out * x0 + c_skip * x
        if i == plan.num_inference_steps - 1:
            return denoised, state
        a_prev = float(self.alphas_cumprod[int(plan.timesteps[i + 1])])
        return math.sqrt(a_prev) * denoised + math.sqrt(1 - a_prev) * draw(noise, x.shape), state


class TCD(LCM):
    """TCD as diffusers' TCDScheduler (LCM's timesteps); eta is its gamma.

    eta defaults to 0, as diffusers' pipelines pass their eta (0.0 unless given) to TCDScheduler.step;
    Zheng et al. recommend 0.3.
    """

    diffusers_name = "TCDScheduler"
    defaults = {**LCM.defaults, "eta": 0.0}
    postprocesses_x0 = False  # diffusers' TCD accepts clip_sample / thresholding but never applies them

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0

    def _validate(self) -> None:
        super()._validate()
        if not 0.0 <= self.config.eta <= 1.0:
            raise ValueError(f"TCD eta (gamma) must be in [0, 1], got {self.config.eta}")

    def _update(self, plan, state, i, x, x0, eps, noise):
        """x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps at s = floor((1 - eta) t'); re-noise to t' (TCD Alg. 4)."""
        last = i == plan.num_inference_steps - 1
        prev_t = 0 if i + 1 >= len(plan.timesteps) else int(plan.timesteps[i + 1])
        s = int(np.floor(F32(1 - self.config.eta) * F32(prev_t)))  # float32, as torch computes it
        a_prev, a_s = float(self.alphas_cumprod[prev_t]), float(self.alphas_cumprod[s])
        denoised = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        if not self.stochastic or last:
            return denoised, state
        ratio = a_prev / a_s
        return math.sqrt(ratio) * denoised + math.sqrt(1 - ratio) * draw(noise, x.shape), state
