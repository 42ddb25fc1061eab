"""DPM-Solver++ singlestep (2S, 3S) and its SDE variant: multi-stage steps from one anchor sample.

A step of order k spans k sigma intervals: the first stage is a first-order step from the
anchor, later stages reuse the anchor with the outputs gathered on the way. The stage
formulas are the multistep ones (dpm_solver.py) with singlestep divided differences.

References:
- Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
  Models": DPM-Solver++(2S), Algorithm 1; third order as DPM-Solver-3 (DPM-Solver, Algorithm 2).
- Lu et al. 2022, "DPM-Solver" (singlestep order schedule, sec. 3.4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import schedules
from .base import COMMON_DEFAULTS, draw
from .dpm_solver import DPMSolverMultistep

F32 = np.float32


@dataclass(frozen=True, eq=False)
class SinglestepState:
    """Converted outputs of the last solver_order steps (oldest first) and the anchor of the current step."""

    outputs: tuple[np.ndarray, ...] = ()
    anchor: np.ndarray | None = None


def singlestep_orders(n: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Order of each of n steps: repeated 1, 2[, 3] cycles, shortened at the end (diffusers get_order_list)."""
    cycle = list(range(1, order + 1))
    if lower_order_final:
        full, rest = divmod(n, order)
        tail = cycle[:rest] if rest else []
        if order == 3 and rest == 0:
            full, tail = full - 1, [1, 2, 1]
        elif order == 2 and rest == 0:
            full, tail = full - 1, [1, 1]
        orders = cycle * full + tail
    else:
        orders = cycle * (n // order)
    if final_zero:
        orders[-1] = 1
    return orders


class DPMSolverSinglestep(DPMSolverMultistep):
    """DPM-Solver++ singlestep as diffusers' DPMSolverSinglestepScheduler (timesteps always linspace)."""

    diffusers_name = "DPMSolverSinglestepScheduler"
    defaults = {**{k: v for k, v in COMMON_DEFAULTS.items() if k != "steps_offset"},
                "solver_order": 2, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "lower_order_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
                "lambda_min_clipped": -math.inf, "variance_type": None, "use_dynamic_shifting": False}
    round_karras_timesteps_always = True

    def _grid(self, n: int) -> np.ndarray:
        return schedules.solver_timesteps("linspace", self.config.num_train_timesteps, n, 0, self._last_timestep())

    def orders(self, n: int) -> list[int]:
        """Per-step orders; diffusers turns lower_order_final on for uneven n or a zero final sigma."""
        cfg = self.config
        zero = cfg.final_sigmas_type == "zero"
        lower = cfg.lower_order_final or n % cfg.solver_order != 0 or zero
        return singlestep_orders(n, cfg.solver_order, lower, zero)

    def init_state(self, plan) -> SinglestepState:
        return SinglestepState()

    def _update(self, plan, state, i, x, x0, eps, noise):
        """Store x0; a first-order stage moves the anchor to x; every stage steps from the anchor."""
        cfg = self.config
        outputs = (*state.outputs, x0.astype(F32))[-cfg.solver_order:]
        z = draw(noise, x.shape) if self.stochastic else None
        order = min(self.orders(len(plan.timesteps))[i], len(outputs))
        anchor = np.asarray(x, F32) if order == 1 else state.anchor
        ms = [np.asarray(m, np.float64) for m in outputs[-order:]]
        prev = self._stage(plan.sigmas, i, np.asarray(anchor, np.float64), ms, z)
        return prev, SinglestepState(outputs, anchor)

    def _stage(self, sigmas, i, x, ms, z):
        """Stage of order len(ms) from the anchor at sigma_{i+1-order} to sigma_{i+1} (DPM-Solver++ Alg. 1)."""
        order = len(ms)
        lam = [schedules.half_log_snr(sigmas[i + 1 - k]) for k in range(order + 1)]  # t, s0, s1, s2
        h = lam[0] - lam[order]
        start = sigmas[i + 1 - order]
        if order == 1:
            return self._integrate(x, ms[0], None, None, h, sigmas[i + 1], start, z, "midpoint")
        r0 = (lam[1] - lam[order]) / h
        if order == 2:
            d1 = (ms[1] - ms[0]) / r0
            return self._integrate(x, ms[0], d1, None, h, sigmas[i + 1], start, z, self.config.solver_type)
        r1 = (lam[2] - lam[3]) / h
        d1_0, d1_1 = (ms[1] - ms[0]) / r1, (ms[2] - ms[0]) / r0
        if self.config.solver_type == "midpoint":  # second-order correction only, with Heun's coefficient
            return self._integrate(x, ms[0], d1_1, None, h, sigmas[i + 1], start, z, "heun")
        d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
        return self._integrate(x, ms[0], d1, d2, h, sigmas[i + 1], start, z, "heun")


__all__ = ["DPMSolverSinglestep", "SinglestepState", "singlestep_orders"]
