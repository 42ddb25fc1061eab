"""UniPC: unified predictor-corrector multistep solver (UniP predictor, UniC corrector).

References:
- Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
  Sampling of Diffusion Models": UniP-p / UniC-p with B(h) = h (bh1) or e^h - 1 (bh2), sec. 3.
- Lu et al. 2022, DPM-Solver++ (data-prediction form, lambda = -log(sigma)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import schedules
from .dpm_solver import _SOLVER_DEFAULTS, VPSolverScheduler
from .parameterization import NoiseLevel

F32 = np.float32


@dataclass(frozen=True, eq=False)
class UniPCState:
    """Converted outputs (oldest first), warm-up count, the last predicted sample and its order."""

    outputs: tuple[np.ndarray, ...] = ()
    lower_order_nums: int = 0
    last_sample: np.ndarray | None = None
    this_order: int = 1


class UniPC(VPSolverScheduler):
    """UniPC as diffusers' UniPCMultistepScheduler (solver_p not supported)."""

    diffusers_name = "UniPCMultistepScheduler"
    defaults = {**_SOLVER_DEFAULTS, "predict_x0": True, "solver_type": "bh2", "disable_corrector": (),
                "solver_p": None}
    round_karras_timesteps_always = True
    final_sigma_follows_schedule = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.config.solver_type not in ("bh1", "bh2", "midpoint", "heun", "logrho"):
            raise ValueError(f"solver_type {self.config.solver_type!r}: use 'bh1' or 'bh2'")

    def _bh2(self) -> bool:
        """diffusers maps the DPM-Solver solver types onto bh2."""
        return self.config.solver_type != "bh1"

    def init_state(self, plan) -> UniPCState:
        return UniPCState()

    def _update(self, plan, state, i, x, x0, eps, noise):
        """Correct x with this step's output (UniC), then predict the next sample (UniP)."""
        cfg, n = self.config, len(plan.timesteps)
        if not cfg.predict_x0 and cfg.thresholding:
            level = self.noise_level(plan, i)
            eps = (x - level.alpha * x0) / level.sigma
        m = (x0 if cfg.predict_x0 else eps).astype(F32)
        if i > 0 and (i - 1) not in cfg.disable_corrector and state.last_sample is not None:
            x = self._corrector(plan.sigmas, i, state, np.asarray(m, np.float64))
        outputs = (*state.outputs, m)[-cfg.solver_order:]
        order = min(cfg.solver_order, n - i) if cfg.lower_order_final else cfg.solver_order
        order = min(order, state.lower_order_nums + 1)
        prev = self._predictor(plan.sigmas, i, x, outputs, order)
        return prev, UniPCState(outputs, min(state.lower_order_nums + 1, cfg.solver_order),
                                np.asarray(x, F32), order)

    def _predictor(self, sigmas, i, x, outputs, order):
        """UniP: x_{i+1} from x_i and the last `order` outputs (Zhao 2023, UniP-p)."""
        ms = [np.asarray(v, np.float64) for v in outputs]
        lams = [schedules.half_log_snr(sigmas[j]) for j in [i + 1] + [i - k for k in range(order)]]
        rks, d1s = self._history(ms, lams, order)
        hh, b_h, b = self._b(lams[0] - lams[1], order)
        if not d1s:
            rhos = np.zeros(0)
        elif order == 2:
            rhos = np.array([0.5])
        else:
            rhos = np.linalg.solve(_vandermonde(rks, order)[:-1, :-1], b[:-1])
        res = sum((r * d for r, d in zip(rhos, d1s)), np.zeros_like(x))
        return self._base(sigmas[i + 1], sigmas[i], x, ms[-1], hh) - self._scale(sigmas[i + 1]) * b_h * res

    def _corrector(self, sigmas, i, state, m_t):
        """UniC: refine x_i with the new output m_t, using the previous step's order (Zhao 2023, UniC-p)."""
        ms = [np.asarray(v, np.float64) for v in state.outputs]
        order, x_last = state.this_order, np.asarray(state.last_sample, np.float64)
        lams = [schedules.half_log_snr(sigmas[j]) for j in [i] + [i - 1 - k for k in range(order)]]
        rks, d1s = self._history(ms, lams, order)
        hh, b_h, b = self._b(lams[0] - lams[1], order)
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(_vandermonde(rks, order), b)
        res = sum((r * d for r, d in zip(rhos[:-1], d1s)), np.zeros_like(m_t)) + rhos[-1] * (m_t - ms[-1])
        return self._base(sigmas[i], sigmas[i - 1], x_last, ms[-1], hh) - self._scale(sigmas[i]) * b_h * res

    @staticmethod
    def _history(ms, lams, order):
        """Ratios r_k = (lambda_{s_k} - lambda_{s_0}) / h and differences (m_k - m_0) / r_k."""
        h = lams[0] - lams[1]
        rks = [(lams[1 + k] - lams[1]) / h for k in range(1, order)]
        d1s = [(ms[-(k + 1)] - ms[-1]) / rk for k, rk in zip(range(1, order), rks)]
        return rks + [1.0], d1s

    def _b(self, h, order):
        """hh = -h (data prediction) or h, B(hh), and the right-hand side b_k = h phi_{k+1}(hh) k! / B(hh)."""
        hh = -h if self.config.predict_x0 else h
        h_phi_k = math.expm1(hh) / hh - 1
        b_h = math.expm1(hh) if self._bh2() else hh
        b, factorial = [], 1
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return hh, b_h, np.array(b)

    def _base(self, sigma_t, sigma_s, x, m0, hh):
        """First-order part: (s_t/s_s) x - a_t (e^hh - 1) m0, or (a_t/a_s) x - s_t (e^hh - 1) m0 for eps."""
        t, s = NoiseLevel.vp_from_sigma(sigma_t), NoiseLevel.vp_from_sigma(sigma_s)
        if self.config.predict_x0:
            return t.sigma / s.sigma * x - t.alpha * math.expm1(hh) * m0
        return t.alpha / s.alpha * x - t.sigma * math.expm1(hh) * m0

    def _scale(self, sigma_t) -> float:
        """a_t for data prediction, s_t for noise prediction."""
        t = NoiseLevel.vp_from_sigma(sigma_t)
        return t.alpha if self.config.predict_x0 else t.sigma


def _vandermonde(rks, order):
    """R[k, j] = r_j ** k, k < order."""
    r = np.asarray(rks, dtype=np.float64)
    return np.stack([r ** k for k in range(order)])
