"""DPM2 and DPM2 ancestral: second-order steps in sigma through a log-sigma midpoint.

Each sigma interval [s_k, s_{k+1}] takes two model calls: an Euler step to the midpoint
sigma_mid = sqrt(s_k * s_{k+1}), then the full step with the slope measured there.
The ancestral variant steps to sigma_down instead and adds noise of std sigma_up.

References:
- Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling
  in Around 10 Steps": DPM-Solver-2 (Algorithm 1, r1 = 1/2), midpoint in lambda = -log(sigma).
- Crowson, k-diffusion `sampling.py`: sample_dpm_2, sample_dpm_2_ancestral, get_ancestral_step.
- Karras et al. 2022 (sigma-space ODE dx/dsigma = (x - x0) / sigma, sec. 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import schedules
from .base import Plan, draw
from .k_samplers import SigmaScheduler, _k_defaults, ancestral_step
from .parameterization import NoiseLevel

F32 = np.float32


@dataclass(frozen=True, eq=False)
class DPM2Plan(Plan):
    """Plan plus, per sigma interval k, the midpoint sigma, where the full step ends, and the added noise std."""

    mids: np.ndarray  # (n,) sigma of the second model call; 0 in the last interval (a plain Euler step)
    ends: np.ndarray  # (n,) s_{k+1} (DPM2) or sigma_down (DPM2 ancestral)
    ups: np.ndarray   # (n,) std of the noise added after the full step (zeros for DPM2)


@dataclass(frozen=True, eq=False)
class DPM2State:
    """The sample at s_k, kept between the midpoint call and the full step (None in the first phase)."""

    sample: np.ndarray | None = None


def log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(lerp(log a, log b, 1/2)) in float32, as torch computes it; 0 where either end is 0."""
    a, b = a.astype(F32), b.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = np.log(a), np.log(b)
        mid = np.exp(lb - (lb - la) * F32(0.5))
    return np.where((a > 0) & (b > 0), mid, F32(0)).astype(F32)


class DPM2(SigmaScheduler):
    """DPM2 as diffusers' KDPM2DiscreteScheduler (k-diffusion sample_dpm_2)."""

    order = 2
    diffusers_name = "KDPM2DiscreteScheduler"
    defaults = _k_defaults(beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False,
                           use_exponential_sigmas=False, use_beta_sigmas=False)
    prediction_types = ("epsilon", "v_prediction")
    rounds_karras_timesteps = True

    def _interval_sigmas(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mids, ends, ups) of each interval from the n + 1 sigmas s (float32)."""
        mids = log_midpoint(s[1:], s[:-1])
        return mids, s[1:].copy(), np.zeros_like(s[1:])

    def _plan(self, n: int) -> DPM2Plan:
        """Timesteps [t0, t(mid0), t1, ..., t(mid_{n-2}), t_{n-1}]; sigmas [s0, s1, s1, ..., s_{n-1}, 0]."""
        timesteps, s = self._schedule(n)
        mids, ends, ups = self._interval_sigmas(s)
        log_table = np.log(schedules.sigma_table(self.alphas_cumprod))
        t_mid = schedules.sigma_to_t(mids[:-1], log_table).astype(F32)
        steps = np.empty(2 * n - 1, dtype=F32)
        steps[0::2], steps[1::2] = timesteps, t_mid
        sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])
        base = self._make_plan(steps, sigmas, n)
        return DPM2Plan(base.timesteps, base.sigmas, base.init_noise_sigma, n,
                        schedules.readonly(mids), schedules.readonly(ends), schedules.readonly(ups))

    def init_state(self, plan: Plan) -> DPM2State:
        return DPM2State()

    def model_noise_level(self, plan: DPM2Plan, i: int) -> NoiseLevel:
        """s_k at the first call of interval k = i // 2, its midpoint sigma at the second."""
        return NoiseLevel.ve(plan.mids[i // 2] if i % 2 else plan.sigmas[i])

    def _update(self, plan, state, i, x, x0, eps, noise):
        """First call: Euler to the midpoint; second: from s_k to the end with the midpoint slope (+ noise)."""
        k, sigma = i // 2, float(plan.sigmas[i - i % 2])
        mid = float(plan.mids[k])
        if i % 2 == 0:
            return x + (x - x0) / sigma * (mid - sigma), DPM2State(np.asarray(x, dtype=F32))
        prev = state.sample + (x - x0) / mid * (float(plan.ends[k]) - sigma)
        if self.stochastic:
            prev = prev + draw(noise, x.shape) * float(plan.ups[k])
        return prev, DPM2State()


class DPM2Ancestral(DPM2):
    """DPM2 ancestral as diffusers' KDPM2AncestralDiscreteScheduler (k-diffusion sample_dpm_2_ancestral)."""

    diffusers_name = "KDPM2AncestralDiscreteScheduler"
    defaults = {**DPM2.defaults, "eta": 1.0}

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0

    def _interval_sigmas(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """sigma_down / sigma_up of each interval (k-diffusion get_ancestral_step), midpoints s_k .. sigma_down."""
        downs, ups = ancestral_step(s[:-1].astype(F32), s[1:].astype(F32), self.config.eta)  # float32 as diffusers
        mids = log_midpoint(s[:-1], downs)
        mids[-1] = 0.0
        return mids, downs, ups


__all__ = ["DPM2", "DPM2Ancestral", "DPM2Plan", "DPM2State", "log_midpoint"]
