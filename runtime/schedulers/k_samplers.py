"""Sigma-space (k-diffusion) samplers: Euler, Euler ancestral, Heun, LMS (DPM2 is in dpm2.py).

They integrate the probability-flow ODE dx/dsigma = (x - x0) / sigma with
x = x0 + sigma * eps; the UNet sees x / sqrt(1 + sigma²).

References:
- Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models":
  Euler and Heun steps (Algorithm 1), sigma schedule (eq. 5).
- Crowson, k-diffusion `sampling.py`: sample_euler_ancestral (get_ancestral_step), sample_lms.
- Song et al. 2021, "Score-Based Generative Modeling through SDEs" (ancestral sampling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import schedules
from .base import COMMON_DEFAULTS, Plan, Scheduler, draw
from .parameterization import NoiseLevel, c_in

F32 = np.float32


def _k_defaults(**extra: Any) -> dict[str, Any]:
    """Keys shared by the diffusers k-diffusion ports, with their defaults."""
    return {**COMMON_DEFAULTS, "timestep_spacing": "linspace", **extra}


class SigmaScheduler(Scheduler):
    """Shared schedule, noise level and input scaling of the sigma-space samplers."""

    karras_uses_config_range: ClassVar[bool] = True  # LMS ignores config sigma_min / sigma_max
    rounds_karras_timesteps: ClassVar[bool] = False  # DPM2 rounds the timesteps of Karras sigmas

    def _validate(self) -> None:
        super()._validate()
        if self.config.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type {self.config.final_sigmas_type!r}: use 'zero' or 'sigma_min'")

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Float32 timesteps and float32 sigmas (with the final sigma) of an n-step run."""
        cfg = self.config
        table = schedules.sigma_table(self.alphas_cumprod)
        timesteps = schedules.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n,
                                               cfg.steps_offset, round_linspace=False).astype(F32)
        sigmas = schedules.interp_sigmas(timesteps, table)
        kind = cfg.sigma_schedule
        if kind is not None:
            own_range = kind != "karras" or self.karras_uses_config_range
            cmin, cmax = (cfg.sigma_min, cfg.sigma_max) if own_range else (None, None)
            lo, hi = schedules.sigma_min_max(cmin, cmax, sigmas[-1], sigmas[0])
            sigmas = schedules.sigma_schedule(kind, lo, hi, n)
            timesteps = schedules.sigma_to_t(sigmas, np.log(table))
            if kind == "karras" and self.rounds_karras_timesteps:
                timesteps = timesteps.round()
            timesteps = timesteps.astype(F32)
        last = table[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        return timesteps, np.concatenate([sigmas, [last]]).astype(F32)

    def _make_plan(self, timesteps: np.ndarray, sigmas: np.ndarray, n: int) -> Plan:
        """Plan with diffusers' init_noise_sigma: max sigma, or 1 / c_in(max) for leading spacing."""
        top = float(sigmas.max())
        init = top if self.config.timestep_spacing in ("linspace", "trailing") else 1.0 / c_in(top)
        return Plan(schedules.readonly(timesteps), schedules.readonly(sigmas), init, n)

    def _plan(self, n: int) -> Plan:
        timesteps, sigmas = self._schedule(n)
        return self._make_plan(timesteps, sigmas, n)

    def noise_level(self, plan: Plan, i: int) -> NoiseLevel:
        return NoiseLevel.ve(plan.sigmas[i])

    def scale_model_input(self, plan: Plan, i: int, sample: np.ndarray) -> np.ndarray:
        """c_in(sigma) x: the VP-scaled UNet input (Karras 2022, Table 1)."""
        scale = c_in(self.model_noise_level(plan, i).sigma)
        return np.asarray(np.asarray(sample, np.float64) * scale, dtype=F32)


class Euler(SigmaScheduler):
    """Euler method in sigma (Karras 2022, Algorithm 1 without the Heun correction)."""

    diffusers_name = "EulerDiscreteScheduler"
    defaults = _k_defaults(interpolation_type="linear", use_karras_sigmas=False, sigma_min=None,
                           sigma_max=None, timestep_type="discrete", rescale_betas_zero_snr=False,
                           final_sigmas_type="zero", use_exponential_sigmas=False, use_beta_sigmas=False)
    clamp_terminal = True

    def _validate(self) -> None:
        super()._validate()
        if self.config.interpolation_type != "linear":
            raise ValueError(f"interpolation_type {self.config.interpolation_type!r} is not supported; "
                             "use 'linear'")
        if self.config.timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type {self.config.timestep_type!r}: use 'discrete' or 'continuous'")

    def _plan(self, n: int) -> Plan:
        timesteps, sigmas = self._schedule(n)
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            timesteps = (F32(0.25) * np.log(sigmas[:-1])).astype(F32)
        return self._make_plan(timesteps, sigmas, n)

    def _update(self, plan, state, i, x, x0, eps, noise):
        """x + (x - x0) / sigma * (sigma_next - sigma)."""
        sigma, sigma_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        return x + (x - x0) / sigma * (sigma_next - sigma), state


def ancestral_step(sigma, sigma_next, eta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_down, sigma_up) of k-diffusion get_ancestral_step; eta = 1 is diffusers' ancestral sampling."""
    # sigma_up = min(s', eta sqrt(s'² (s² - s'²) / s²)), sigma_down = sqrt(s'² - sigma_up²) in the inputs'
    # precision, as diffusers computes them; where s >> s' cancels the latter to 0 (diffusers then gives
    # NaN), its exact form s' sqrt(1 - eta² + eta² (s'/s)²).
    s, s_next = np.asarray(sigma), np.asarray(sigma_next)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(s > 0, np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2), 0).astype(s.dtype)
        if eta != 1.0:
            up = np.minimum(s_next, eta * up)
        down = np.sqrt(np.maximum(s_next ** 2 - up ** 2, 0))
        exact = s_next * np.sqrt(np.maximum(1 - eta ** 2 + eta ** 2 * np.where(s > 0, s_next / s, 0) ** 2, 0))
    return np.where((down == 0) & (exact > 0), exact, down).astype(s.dtype), up


class EulerAncestral(SigmaScheduler):
    """Euler step down to sigma_down plus fresh noise of std sigma_up (k-diffusion sample_euler_ancestral)."""

    diffusers_name = "EulerAncestralDiscreteScheduler"
    # diffusers' class has no sigma-schedule flags; A1111 (k-diffusion) runs it on any schedule type, so we do too
    defaults = _k_defaults(rescale_betas_zero_snr=False, eta=1.0, use_karras_sigmas=False, use_exponential_sigmas=False,
                           use_beta_sigmas=False, sigma_min=None, sigma_max=None, final_sigmas_type="zero")
    prediction_types = ("epsilon", "v_prediction")
    clamp_terminal = True

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0

    def _update(self, plan, state, i, x, x0, eps, noise):
        """Euler to sigma_down, plus sigma_up z (z drawn at every step, as diffusers does, while eta > 0)."""
        s = float(plan.sigmas[i])
        sigma_down, sigma_up = map(float, ancestral_step(np.float64(s), np.float64(plan.sigmas[i + 1]),
                                                         self.config.eta))
        prev = x + (x - x0) / s * (sigma_down - s)
        return (prev + draw(noise, x.shape) * sigma_up if self.stochastic else prev), state


@dataclass(frozen=True, eq=False)
class HeunState:
    """Heun's pending Euler step: its derivative, step size and start sample (None in the first phase)."""

    derivative: np.ndarray | None = None
    dt: float | None = None
    sample: np.ndarray | None = None


class Heun(SigmaScheduler):
    """Heun's second-order method (Karras 2022, Algorithm 1); two UNet calls per sigma interval."""

    order = 2
    diffusers_name = "HeunDiscreteScheduler"
    defaults = _k_defaults(beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False,
                           sigma_min=None, sigma_max=None, clip_sample=False, clip_sample_range=1.0,
                           use_exponential_sigmas=False, use_beta_sigmas=False)

    def _plan(self, n: int) -> Plan:
        """Every sigma after the first is visited twice: [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]."""
        timesteps, sigmas = self._schedule(n)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        return self._make_plan(timesteps, sigmas, n)

    def init_state(self, plan: Plan) -> HeunState:
        return HeunState()

    def _update(self, plan, state, i, x, x0, eps, noise):
        """First phase: Euler step, remembered; second phase: redo it with the mean slope."""
        sigma = float(plan.sigmas[i])
        if state.dt is None:
            d = ((x - x0) / sigma).astype(F32)
            dt = float(plan.sigmas[i + 1]) - sigma
            return x + d * dt, HeunState(d, dt, np.asarray(x, dtype=F32))
        d = (state.derivative + (x - x0) / sigma) / 2
        return state.sample + d * state.dt, HeunState()


@dataclass(frozen=True, eq=False)
class LMSState:
    """The last (up to 4) derivatives (x - x0) / sigma, oldest first."""

    derivatives: tuple[np.ndarray, ...] = ()


_GAUSS_X, _GAUSS_W = np.polynomial.legendre.leggauss(4)


def lms_coefficient(sigmas: np.ndarray, order: int, t: int, j: int) -> float:
    """Integral over [sigma_t, sigma_{t+1}] of the j-th Lagrange polynomial on sigma_t .. sigma_{t-order+1}."""
    a, b = float(sigmas[t]), float(sigmas[t + 1])
    tau = (b - a) / 2 * _GAUSS_X + (a + b) / 2
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod *= (tau - sigmas[t - k]) / (float(sigmas[t - j]) - float(sigmas[t - k]))
    return float((b - a) / 2 * np.dot(_GAUSS_W, prod))


class LMS(SigmaScheduler):
    """Linear multistep (Adams-Bashforth in sigma) of order up to 4 (k-diffusion sample_lms)."""

    diffusers_name = "LMSDiscreteScheduler"
    defaults = _k_defaults(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
    karras_uses_config_range = False
    max_order: ClassVar[int] = 4

    def init_state(self, plan: Plan) -> LMSState:
        return LMSState()

    def _update(self, plan, state, i, x, x0, eps, noise):
        """x + sum_j c_j d_{i-j}; the order grows with i as in diffusers (also after an img2img start)."""
        sigmas = plan.sigmas.astype(np.float64)
        derivs = (*state.derivatives, ((x - x0) / sigmas[i]).astype(F32))[-self.max_order:]
        order = min(i + 1, self.max_order)
        coeffs = [lms_coefficient(sigmas, order, i, j) for j in range(order)]
        prev = x + sum(c * d for c, d in zip(coeffs, reversed(derivs)))
        return prev, LMSState(derivs)


__all__ = ["Euler", "EulerAncestral", "Heun", "LMS", "HeunState", "LMSState", "ancestral_step"]
