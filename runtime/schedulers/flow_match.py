"""Flow-matching samplers (rectified flow): Euler and Heun over sigma in [0, 1], as diffusers' FlowMatch* classes.

A sample at noise level sigma is x = (1 - sigma) x0 + sigma eps; the model (SD3's MMDiT) predicts the velocity
v = eps - x0, so the sampler integrates the ODE dx/dsigma = v from sigma = 1 down to 0. The timestep the model
sees is sigma * num_train_timesteps.

References:
- Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023, "Flow Straight and Fast"
  (rectified flow, x = (1 - t) x0 + t eps).
- Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3):
  timestep shift sigma' = s sigma / (1 + (s - 1) sigma), sec. 5.3.2, eq. 23; resolution-dependent shift.
- diffusers FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler (schedules, float32 rounding,
  the shift applied to the training sigmas and again to the inference sigmas, as they do);
  StableDiffusion3Pipeline's calculate_shift and StableDiffusion3Img2ImgPipeline.get_timesteps.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import schedules
from .base import Plan, Scheduler, draw
from .k_samplers import Heun
from .parameterization import NoiseLevel

F32 = np.float32
FLOW_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0}
TIME_SHIFTS = ("exponential", "linear")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's timestep shift s sigma / (1 + (s - 1) sigma) (Esser et al. 2024, eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(kind: str, mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Resolution-dependent shift: e^mu / (e^mu + 1/sigma - 1) (exponential) or mu / (mu + 1/sigma - 1)."""
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / sigmas - 1))


def resolution_mu(config, image_seq_len: int) -> float:
    """mu for dynamic shifting: linear in the image's token count (diffusers' calculate_shift)."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return image_seq_len * m + config.base_shift - m * config.base_image_seq_len


class FlowMatchScheduler(Scheduler):
    """Shared schedule, noise level and step of the flow-matching samplers; subclasses give the update rule."""

    defaults = FLOW_DEFAULTS

    def _validate(self) -> None:
        super()._validate()
        if self.config.time_shift_type not in TIME_SHIFTS:
            raise ValueError(f"time_shift_type {self.config.time_shift_type!r}: use 'exponential' or 'linear'")

    def _train_sigmas(self) -> np.ndarray:
        """The float32 training sigmas N/N .. 1/N, shifted unless the shift is resolution-dependent."""
        n = self.config.num_train_timesteps
        sigmas = np.linspace(1, n, n, dtype=F32)[::-1] / F32(n)
        return sigmas if self.config.use_dynamic_shifting else shift_sigmas(sigmas, self.config.shift).astype(F32)

    def _inference_sigmas(self, n: int) -> np.ndarray:
        """n sigmas evenly spaced between the training sigmas' ends (float64, before any shift)."""
        train, t = self._train_sigmas(), self.config.num_train_timesteps
        return np.linspace(float(train[0]) * t, float(train[-1]) * t, n) / t

    def noise_level(self, plan: Plan, i: int) -> NoiseLevel:
        """x = (1 - sigma) x0 + sigma eps."""
        sigma = float(plan.sigmas[i])
        return NoiseLevel(1.0 - sigma, sigma)

    def step(self, plan: Plan, state: Any, i: int, model_output: np.ndarray, sample: np.ndarray,
             noise=None) -> tuple[np.ndarray, Any]:
        """Sample at step i + 1 from the velocity at step i: x0 = x - sigma v, then the update rule."""
        if self.stochastic and noise is None:
            raise ValueError(f"{self.name} is stochastic: step() needs a noise(shape) callable")
        x, v = np.asarray(sample, np.float64), np.asarray(model_output, np.float64)
        x0 = x - float(plan.sigmas[i]) * v
        with np.errstate(divide="ignore", invalid="ignore"):
            prev, state = self._update(plan, state, i, x, x0, v, noise)
        return np.asarray(prev, dtype=F32), state

    def img2img_start(self, plan: Plan, strength: float) -> int:
        """First step index of img2img, as StableDiffusion3Img2ImgPipeline.get_timesteps (strength not floored)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        n = plan.num_inference_steps
        return int(max(n - min(n * strength, n), 0)) * self.order


class FlowMatchEuler(FlowMatchScheduler):
    """Euler steps of the flow ODE, x' = x + (sigma' - sigma) v; optionally re-noised (stochastic_sampling)."""

    diffusers_name = "FlowMatchEulerDiscreteScheduler"
    defaults = {**FLOW_DEFAULTS, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
                "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False}
    supported_flags = frozenset({"use_dynamic_shifting"})

    @property
    def stochastic(self) -> bool:
        return self.config.stochastic_sampling

    def _plan(self, n: int, mu: float | None = None) -> Plan:
        """diffusers' set_timesteps(n, mu): shift (fixed or by mu), terminal stretch, sigma schedule, final 0."""
        cfg = self.config
        sigmas = self._inference_sigmas(n)
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("use_dynamic_shifting needs mu (set from the image size by the pipeline)")
            sigmas = time_shift(cfg.time_shift_type, mu, sigmas)
        else:
            sigmas = shift_sigmas(sigmas, cfg.shift)
        if cfg.shift_terminal:
            one_minus = 1 - sigmas                  # stretch so that the last sigma is shift_terminal
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
        if cfg.sigma_schedule is not None:
            sigmas = schedules.sigma_schedule(cfg.sigma_schedule, float(sigmas[-1]), float(sigmas[0]), n)
        sigmas = sigmas.astype(F32)
        end = F32(0.0)
        if cfg.invert_sigmas:
            sigmas, end = (F32(1.0) - sigmas).astype(F32), F32(1.0)
        timesteps = (sigmas * F32(cfg.num_train_timesteps)).astype(F32)
        return Plan(schedules.readonly(timesteps), schedules.readonly(np.append(sigmas, end).astype(F32)), 1.0, n)

    def _update(self, plan, state, i, x, x0, v, noise):
        """Euler in sigma; stochastic: the next level's mix of x0 and fresh noise."""
        sigma_next = float(plan.sigmas[i + 1])
        if self.stochastic:
            return (1.0 - sigma_next) * x0 + sigma_next * draw(noise, x.shape), state
        return x + (sigma_next - float(plan.sigmas[i])) * v, state


class FlowMatchHeun(FlowMatchScheduler):
    """Heun's method on the flow ODE (Karras 2022, Algorithm 1, no churn): two model calls per interval."""

    order = 2
    diffusers_name = "FlowMatchHeunDiscreteScheduler"
    init_state = Heun.init_state
    _update = Heun._update              # the same predictor-corrector in sigma, with x0 = x - sigma v

    def _plan(self, n: int) -> Plan:
        """Shifted sigmas, every one after the first visited twice: [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]."""
        sigmas = shift_sigmas(self._inference_sigmas(n), self.config.shift).astype(F32)
        timesteps = (sigmas * F32(self.config.num_train_timesteps)).astype(F32)
        sigmas = np.append(sigmas, F32(0.0))
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        return Plan(schedules.readonly(timesteps), schedules.readonly(sigmas.astype(F32)), 1.0, n)


__all__ = ["FlowMatchEuler", "FlowMatchHeun", "FlowMatchScheduler", "resolution_mu", "shift_sigmas", "time_shift"]
