"""PNDM: pseudo numerical methods on the DDIM transfer; PLMS (skip_prk_steps) and PRK warm-up.

The multistep combination acts on raw model outputs and is converted to eps afterwards,
at the step's own timestep, as in diffusers (this matters only for v-prediction).

References:
- Liu, Ren, Lin, Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds":
  transfer part phi (eq. 11), pseudo linear multistep PLMS and pseudo Runge-Kutta PRK (sec. 3.3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import schedules
from .base import COMMON_DEFAULTS, Plan, Scheduler, check_range
from .parameterization import NoiseLevel, predict

F32 = np.float32


@dataclass(frozen=True, eq=False)
class PNDMPlan(Plan):
    """Plan plus the PRK warm-up timesteps (empty with skip_prk_steps)."""

    prk_timesteps: np.ndarray


@dataclass(frozen=True, eq=False)
class PNDMState:
    """Step counter, past model outputs (ets), the saved sample and the running PRK sum."""

    counter: int = 0
    ets: tuple[np.ndarray, ...] = ()
    cur_sample: np.ndarray | None = None
    cur_model_output: np.ndarray | float = 0.0


class PNDM(Scheduler):
    """PNDM / PLMS (Liu 2022) as diffusers' PNDMScheduler."""

    diffusers_name = "PNDMScheduler"
    defaults = {**COMMON_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False,
                "timestep_spacing": "leading"}
    prediction_types = ("epsilon", "v_prediction")

    def _plan(self, n: int) -> PNDMPlan:
        cfg = self.config
        if not cfg.skip_prk_steps and n < 4:
            raise ValueError(f"PNDM with PRK warm-up needs at least 4 steps, got {n}")
        ts = schedules.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n,
                                        cfg.steps_offset)[::-1]  # ascending
        if cfg.skip_prk_steps:
            prk = np.zeros(0)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        else:
            half = cfg.num_train_timesteps // n // 2
            prk = np.repeat(ts[-4:], 2) + np.tile([0, half], 4)
            prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
            plms = ts[:-3][::-1]
        timesteps = check_range(np.concatenate([prk, plms]), cfg)
        return PNDMPlan(schedules.readonly(timesteps), None, 1.0, n, schedules.readonly(prk))

    def init_state(self, plan: Plan) -> PNDMState:
        return PNDMState()

    def step(self, plan, state, i, model_output, sample, noise=None):
        """PRK while counter < len(prk_timesteps), then PLMS."""
        out, x = np.asarray(model_output, np.float64), np.asarray(sample, np.float64)
        t = int(plan.timesteps[i])
        if not self.config.skip_prk_steps and state.counter < len(plan.prk_timesteps):
            prev, state = self._prk(plan, state, t, out, x)
        else:
            prev, state = self._plms(plan, state, t, out, x)
        return np.asarray(prev, dtype=F32), state

    def _prk(self, plan, state, t, out, x):
        """Pseudo Runge-Kutta: four transfers per interval, weights 1/6, 1/3, 1/3, 1/6 (Liu 2022, sec. 3.3)."""
        c, ets, cur, acc = state.counter, state.ets, state.cur_sample, state.cur_model_output
        prev_t = t - (0 if c % 2 else self.config.num_train_timesteps // plan.num_inference_steps // 2)
        t = int(plan.prk_timesteps[c // 4 * 4])
        if c % 4 == 0:
            acc, ets, cur = acc + out / 6, (*ets, out.astype(F32)), np.asarray(x, F32)
        elif c % 4 in (1, 2):
            acc = acc + out / 3
        else:
            out, acc = acc + out / 6, 0.0
        base = x if cur is None else cur
        prev = self._transfer(base, t, prev_t, out)
        return prev, PNDMState(c + 1, ets, cur, acc)

    def _plms(self, plan, state, t, out, x):
        """Pseudo linear multistep: Adams-Bashforth weights on the last 1-4 outputs (Liu 2022, sec. 3.3)."""
        c, ets, cur = state.counter, state.ets, state.cur_sample
        ratio = self.config.num_train_timesteps // plan.num_inference_steps
        prev_t = t - ratio
        if c != 1:
            ets = (*ets[-3:], out.astype(F32))
        else:
            prev_t, t = t, t + ratio
        e = [np.asarray(v, np.float64) for v in ets]
        if len(e) == 1 and c == 0:
            combined, cur = out, np.asarray(x, F32)
        elif len(e) == 1 and c == 1:
            combined, x, cur = (out + e[-1]) / 2, np.asarray(cur, np.float64), None
        elif len(e) == 2:
            combined = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            combined = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            combined = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        prev = self._transfer(x, t, prev_t, combined)
        return prev, PNDMState(c + 1, ets, cur, state.cur_model_output)

    def _transfer(self, x, t, prev_t, model_output):
        """Transfer phi(x_t, eps, t, t') of Liu 2022, eq. 11 (DDIM in closed form)."""
        a = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod()
        _, eps = predict(self.config.prediction_type, model_output, x, NoiseLevel.vp(a))
        denom = a * math.sqrt(1 - a_prev) + math.sqrt(a * (1 - a) * a_prev)
        return math.sqrt(a_prev / a) * x - (a_prev - a) * eps / denom
