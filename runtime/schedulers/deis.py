"""DEIS: diffusion exponential integrator sampler, multistep in rho = sigma / alpha with a log-rho basis.

The noise prediction is extrapolated by a Lagrange polynomial in log rho over the last
1-3 steps and integrated exactly in rho: x_t / alpha_t = x_s / alpha_s + sum_j c_j eps_j.

References:
- Zhang, Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator":
  rho-space ODE dx/drho (eq. 12) and rhoAB-DEIS (eq. 15) with the log-rho polynomial basis.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .dpm_solver import _SOLVER_DEFAULTS, MultistepState, VPSolverScheduler, multistep_order
from .parameterization import NoiseLevel

F32 = np.float32
log = math.log


def _basis2(t: float, b: float, c: float) -> float:
    """Antiderivative in rho of the log-rho Lagrange basis through (b, c), at rho = t (DEIS eq. 15, r = 1)."""
    return t * (-log(c) + log(t) - 1) / (log(b) - log(c))


def _basis3(t: float, b: float, c: float, d: float) -> float:
    """Antiderivative in rho of the log-rho Lagrange basis through (b, c, d), at rho = t (DEIS eq. 15, r = 2)."""
    lt, lc, ld = log(t), log(c), log(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt ** 2 - 2 * lt + 2)
    return num / ((log(b) - lc) * (log(b) - ld))


def deis_coefficients(rho_t: float, rhos: list[float]) -> list[float]:
    """c_j = integral from rhos[0] to rho_t of the j-th basis polynomial; rhos newest first (orders 2, 3)."""
    s0 = rhos[0]
    if len(rhos) == 2:
        b, c = rhos
        return [_basis2(rho_t, b, c) - _basis2(s0, b, c), _basis2(rho_t, c, b) - _basis2(s0, c, b)]
    b, c, d = rhos
    return [_basis3(rho_t, b, c, d) - _basis3(s0, b, c, d), _basis3(rho_t, c, d, b) - _basis3(s0, c, d, b),
            _basis3(rho_t, d, b, c) - _basis3(s0, d, b, c)]


class DEIS(VPSolverScheduler):
    """DEIS (log-rho, order 1-3) as diffusers' DEISMultistepScheduler."""

    diffusers_name = "DEISMultistepScheduler"
    defaults = {**{k: v for k, v in _SOLVER_DEFAULTS.items()
                   if k not in ("final_sigmas_type", "sigma_min", "sigma_max", "rescale_betas_zero_snr")},
                "algorithm_type": "deis", "solver_type": "logrho"}
    round_karras_timesteps_always = True
    final_sigma_follows_schedule = True

    def _validate(self) -> None:
        super()._validate()
        cfg = self.config
        if cfg.algorithm_type not in ("deis", "dpmsolver", "dpmsolver++"):
            raise ValueError(f"algorithm_type {cfg.algorithm_type!r} is not supported; use 'deis'")
        if cfg.solver_type not in ("logrho", "midpoint", "heun", "bh1", "bh2"):
            raise ValueError(f"solver_type {cfg.solver_type!r} is not supported; use 'logrho'")
        if cfg.solver_order > 3:
            raise ValueError(f"solver_order must be 1, 2 or 3, got {cfg.solver_order}")

    def __post_init__(self) -> None:
        """DEIS has no final_sigmas_type: it always ends at sigma_min, never at 0."""
        object.__setattr__(self, "config", replace(self.config, final_sigmas_type="sigma_min"))
        super().__post_init__()

    def _update(self, plan, state, i, x, x0, eps, noise):
        """Store eps recomputed from the (thresholded) x0, pick the order as DPM-Solver, take the step."""
        cfg = self.config
        here = self.noise_level(plan, i)
        outputs = (*state.outputs, ((x - here.alpha * x0) / here.sigma).astype(F32))[-cfg.solver_order:]
        nums = state.lower_order_nums
        order = multistep_order(cfg, i, len(plan.timesteps), nums)
        ms = [np.asarray(m, np.float64) for m in outputs[-order:]]
        return self._step(plan.sigmas, i, x, ms), MultistepState(outputs, min(nums + 1, cfg.solver_order))

    @staticmethod
    def _step(sigmas, i, x, ms):
        """x_t = (a_t/a_s) x - s_t (e^h - 1) eps at order 1, else a_t (x / a_s + sum_j c_j eps_j)."""
        target, here = NoiseLevel.vp_from_sigma(sigmas[i + 1]), NoiseLevel.vp_from_sigma(sigmas[i])
        if len(ms) == 1:
            h = math.log(float(sigmas[i])) - math.log(float(sigmas[i + 1]))
            return (target.alpha / here.alpha) * x - (target.sigma * math.expm1(h)) * ms[0]
        rhos = [float(sigmas[i - k]) for k in range(len(ms))]
        coeffs = deis_coefficients(float(sigmas[i + 1]), rhos)
        return target.alpha * (x / here.alpha + sum(c * m for c, m in zip(coeffs, reversed(ms))))


__all__ = ["DEIS", "deis_coefficients"]
