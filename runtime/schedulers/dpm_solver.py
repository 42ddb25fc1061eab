"""DPM-Solver++ multistep (2M, 3M) and its SDE variant, in half-log-SNR time lambda = -log(sigma).

References:
- Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling
  in Around 10 Steps" (exponential integrators in lambda, sec. 3).
- Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
  Models": data-prediction multistep DPM-Solver++(2M), Algorithm 2; SDE-DPM-Solver++ (sec. 5).
- Karras et al. 2022 (sigma schedule, eq. 5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from . import schedules
from .base import COMMON_DEFAULTS, Plan, Scheduler, draw
from .parameterization import NoiseLevel

F32 = np.float32
exp, expm1 = math.exp, math.expm1

_SOLVER_DEFAULTS = {**COMMON_DEFAULTS, "solver_order": 2, "thresholding": False,
                    "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
                    "lower_order_final": True, "use_karras_sigmas": False, "sigma_min": None,
                    "sigma_max": None, "final_sigmas_type": "zero", "timestep_spacing": "linspace",
                    "rescale_betas_zero_snr": False, "use_exponential_sigmas": False,
                    "use_beta_sigmas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False}


@dataclass(frozen=True, eq=False)
class MultistepState:
    """Converted model outputs of the last solver_order steps (oldest first) and the warm-up count."""

    outputs: tuple[np.ndarray, ...] = ()
    lower_order_nums: int = 0


class VPSolverScheduler(Scheduler):
    """Schedule and noise level shared by the VP multistep solvers (DPM-Solver++, UniPC)."""

    clamp_terminal = True
    round_karras_timesteps_always = False  # UniPC rounds even for squaredcos_cap_v2
    final_sigma_follows_schedule = False  # see _final_sigma

    def _validate(self) -> None:
        super()._validate()
        if self.config.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type {self.config.final_sigmas_type!r}: use 'zero' or 'sigma_min'")
        if self.config.solver_order < 1:
            raise ValueError(f"solver_order must be at least 1, got {self.config.solver_order}")

    def _last_timestep(self) -> int:
        """End of the timestep grid (DPM-Solver clips it with lambda_min_clipped)."""
        return self.config.num_train_timesteps

    def _grid(self, n: int) -> np.ndarray:
        """The n timesteps of the configured spacing, before any custom sigma schedule."""
        cfg = self.config
        return schedules.solver_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n,
                                          cfg.steps_offset, self._last_timestep())

    def _custom_timesteps(self, kind: str, sigmas: np.ndarray, log_table: np.ndarray,
                          grid: np.ndarray) -> np.ndarray:
        """Timesteps of custom sigmas; diffusers rounds those of Karras sigmas (not for cosine betas here)."""
        timesteps = schedules.sigma_to_t(sigmas, log_table)
        cosine = self.config.beta_schedule == "squaredcos_cap_v2"
        if kind == "karras" and (self.round_karras_timesteps_always or not cosine):
            timesteps = timesteps.round()
        return timesteps

    def _plan(self, n: int) -> Plan:
        cfg = self.config
        table = schedules.sigma_table(self.alphas_cumprod)
        timesteps = self._grid(n)
        kind = cfg.sigma_schedule
        if kind is not None:
            lo, hi = schedules.sigma_min_max(cfg.sigma_min, cfg.sigma_max, table[0], table[-1])
            sigmas = schedules.sigma_schedule(kind, lo, hi, n)
            timesteps = self._custom_timesteps(kind, sigmas, np.log(table), timesteps)
        else:
            sigmas = schedules.interp_sigmas(timesteps, table)
        last = self._final_sigma(table, sigmas)
        sigmas = np.concatenate([sigmas, [last]]).astype(F32)
        timesteps = np.trunc(timesteps)  # diffusers stores int64
        return Plan(schedules.readonly(timesteps), schedules.readonly(sigmas), 1.0, len(timesteps))

    def _final_sigma(self, table: np.ndarray, sigmas: np.ndarray) -> float:
        """Sigma after the last step: 0, or for "sigma_min" the smallest training sigma (UniPC and DEIS:
        the last scheduled sigma again under Karras / exponential / beta sigmas)."""
        if self.config.final_sigmas_type != "sigma_min":
            return 0.0
        custom = self.final_sigma_follows_schedule and self.config.sigma_schedule
        return float(sigmas[-1] if custom else table[0])

    def noise_level(self, plan: Plan, i: int) -> NoiseLevel:
        return NoiseLevel.vp_from_sigma(plan.sigmas[i])

    def init_state(self, plan: Plan) -> MultistepState:
        return MultistepState()


class DPMSolverMultistep(VPSolverScheduler):
    """DPM-Solver++ / SDE-DPM-Solver++ of order 1-3 as diffusers' DPMSolverMultistepScheduler."""

    diffusers_name = "DPMSolverMultistepScheduler"
    defaults = {**_SOLVER_DEFAULTS, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "euler_at_final": False, "lambda_min_clipped": -math.inf, "variance_type": None,
                "use_lu_lambdas": False}
    algorithms = ("dpmsolver++", "sde-dpmsolver++")

    def __post_init__(self) -> None:
        cfg = self.config
        if cfg.algorithm_type == "deis":
            cfg = replace(cfg, algorithm_type="dpmsolver++")
        if cfg.solver_type in ("logrho", "bh1", "bh2"):
            cfg = replace(cfg, solver_type="midpoint")
        object.__setattr__(self, "config", cfg)
        super().__post_init__()

    def _validate(self) -> None:
        super()._validate()
        cfg = self.config
        if cfg.algorithm_type not in self.algorithms:
            raise ValueError(f"algorithm_type {cfg.algorithm_type!r} is not supported; use one of "
                             f"{', '.join(self.algorithms)}")
        if cfg.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type {cfg.solver_type!r}: use 'midpoint' or 'heun'")
        if cfg.solver_order > 3:
            raise ValueError(f"solver_order must be 1, 2 or 3, got {cfg.solver_order}")
        if cfg.variance_type in ("learned", "learned_range"):
            raise ValueError(f"variance_type {cfg.variance_type!r} is not supported")

    @property
    def stochastic(self) -> bool:
        return self.config.algorithm_type == "sde-dpmsolver++"

    def _last_timestep(self) -> int:
        """num_train_timesteps minus the steps whose lambda is below lambda_min_clipped."""
        ac = self.alphas_cumprod
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1) - ac))
        clipped = int(np.searchsorted(lam[::-1], self.config.lambda_min_clipped))
        return self.config.num_train_timesteps - clipped

    def _update(self, plan, state, i, x, x0, eps, noise):
        """Store x0, pick the order (warm-up and lower_order_final as diffusers), take the step."""
        cfg = self.config
        outputs = (*state.outputs, x0.astype(F32))[-cfg.solver_order:]
        nums = state.lower_order_nums
        z = draw(noise, x.shape) if self.stochastic else None
        order = multistep_order(cfg, i, len(plan.timesteps), nums,
                                first_at_final=cfg.euler_at_final or cfg.final_sigmas_type == "zero")
        ms = [np.asarray(m, np.float64) for m in outputs[-order:]]
        prev = self._solve(plan.sigmas, i, x, ms, z)
        return prev, MultistepState(outputs, min(nums + 1, cfg.solver_order))

    def _solve(self, sigmas, i, x, ms, z):
        """One multistep DPM-Solver++ step of order len(ms) from sigma_i to sigma_{i+1}."""
        lam = [schedules.half_log_snr(sigmas[i + 1 - k]) for k in range(len(ms) + 1)]
        h = lam[0] - lam[1]
        d1, d2 = _differences(ms, lam, h)
        return self._integrate(x, ms[-1], d1, d2, h, sigmas[i + 1], sigmas[i], z, self.config.solver_type)

    def _integrate(self, x, d0, d1, d2, h, sigma_to, sigma_from, z, solver_type):
        """The ODE or SDE DPM-Solver++ update of x at sigma_from to sigma_to, from D0 (and D1, D2)."""
        target, here = NoiseLevel.vp_from_sigma(sigma_to), NoiseLevel.vp_from_sigma(sigma_from)
        if self.config.algorithm_type == "sde-dpmsolver++":
            return _sde_step(x, d0, d1, d2, h, target, here, z, solver_type)
        return _ode_step(x, d0, d1, d2, h, target, here, solver_type)


def multistep_order(cfg, i: int, n: int, warmed: int, *, first_at_final: bool = False) -> int:
    """Order of multistep step i of n: limited by the warm-up and, under 15 steps, by lower_order_final."""
    short = cfg.lower_order_final and n < 15
    if cfg.solver_order == 1 or warmed < 1 or (i == n - 1 and (first_at_final or short)):
        return 1
    if cfg.solver_order == 2 or warmed < 2 or (i == n - 2 and short):
        return 2
    return 3


def _differences(ms, lam, h):
    """Scaled divided differences D1, D2 of the x0 history (Lu et al. 2022, DPM-Solver++ Alg. 2)."""
    if len(ms) == 1:
        return None, None
    r0 = (lam[1] - lam[2]) / h
    d1_0 = (ms[-1] - ms[-2]) / r0
    if len(ms) == 2:
        return d1_0, None
    r1 = (lam[2] - lam[3]) / h
    d1_1 = (ms[-2] - ms[-3]) / r1
    return d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def _ode_step(x, d0, d1, d2, h, target, here, solver_type):
    """x_t = (s_t/s_s) x - a_t (e^-h - 1) D0 + second/third-order terms (DPM-Solver++ 1M/2M/3M)."""
    a_t, phi1 = target.alpha, expm1(-h)
    out = (target.sigma / here.sigma) * x - (a_t * phi1) * d0
    if d1 is not None and d2 is None and solver_type == "midpoint":
        return out - (0.5 * a_t * phi1) * d1
    if d1 is not None:
        out = out + (a_t * (phi1 / h + 1.0)) * d1
    if d2 is not None:
        out = out - (a_t * ((phi1 + h) / h ** 2 - 0.5)) * d2
    return out


def _sde_step(x, d0, d1, d2, h, target, here, z, solver_type):
    """SDE-DPM-Solver++: x_t = (s_t/s_s) e^-h x + a_t (1 - e^-2h) D0 + ... + s_t sqrt(1 - e^-2h) z."""
    a_t, one_m = target.alpha, -expm1(-2.0 * h)
    out = (target.sigma / here.sigma * exp(-h)) * x + (a_t * one_m) * d0
    if d1 is not None and d2 is None and solver_type == "midpoint":
        out = out + (0.5 * a_t * one_m) * d1
    elif d1 is not None:
        out = out + (a_t * (one_m / (-2.0 * h) + 1.0)) * d1
    if d2 is not None:
        out = out + (a_t * ((one_m - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
    return out + target.sigma * math.sqrt(one_m) * z
