"""Noise schedules shared by every scheduler: betas, alphas_cumprod, timestep grids, sigmas.

Tables are float32, as diffusers builds them; grids and sigma schedules are float64
until a scheduler casts them, as diffusers does.

References:
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (linear betas, eq. 4).
- Nichol, Dhariwal 2021, "Improved DDPM" (cosine schedule, eq. 17).
- Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed"
  (zero terminal SNR, Algorithm 1; "trailing" spacing, Table 2).
- Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
  Models" (sigma schedule, eq. 5).
- Crowson, k-diffusion `sampling.py`: get_sigmas_exponential (log-linear sigmas).
- Lee et al. 2024, "Beta Sampling is All You Need" (beta(0.6, 0.6) quantile schedule, sec. 3).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

F32 = np.float32
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SCHEDULES = ("karras", "exponential", "beta")


def betas(schedule: str, num_train: int, beta_start: float, beta_end: float,
          trained: Sequence[float] | None = None) -> np.ndarray:
    """Per-step betas: trained, linear, scaled_linear (SD) or squaredcos_cap_v2 (Nichol 2021, eq. 17)."""
    if trained is not None:
        return np.asarray(trained, dtype=F32)
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train).astype(F32)
    if schedule == "scaled_linear":
        return np.square(np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train).astype(F32))
    if schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train)
    raise ValueError(f"beta_schedule {schedule!r} is not supported; use one of {', '.join(BETA_SCHEDULES)}")


def _cosine_betas(num_train: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2), capped at 0.999 (Nichol 2021, eq. 17)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    out = [min(1 - alpha_bar((i + 1) / num_train) / alpha_bar(i / num_train), max_beta)
           for i in range(num_train)]
    return np.asarray(out, dtype=F32)


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64 and stored float32 (as torch.cumprod on CPU)."""
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2024, Algorithm 1)."""
    root = np.sqrt(_cumprod(F32(1) - b))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = np.square(root)
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return F32(1) - alphas


def alphas_cumprod(b: np.ndarray, *, zero_snr: bool = False, clamp_terminal: bool = False) -> np.ndarray:
    """alpha_bar_t = prod(1 - beta_s) (Ho 2020, eq. 4); optional zero-terminal-SNR rescale and 2**-24 clamp."""
    if zero_snr:
        b = rescale_zero_terminal_snr(b)
    out = _cumprod(F32(1) - b)
    if zero_snr and clamp_terminal:
        out[-1] = 2.0 ** -24
    out.flags.writeable = False
    return out


def sigma_table(ac: np.ndarray) -> np.ndarray:
    """k-diffusion noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending in t."""
    return np.sqrt((F32(1) - ac) / ac)


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int = 0, *,
                     round_linspace: bool = True) -> np.ndarray:
    """Descending float64 timestep grid for leading / trailing / linspace spacing (Lin et al. 2024, Table 2)."""
    if spacing == "linspace":
        grid = np.linspace(0, num_train - 1, n)[::-1]
        return grid.round() if round_linspace else grid.copy()
    if spacing == "leading":
        return (np.arange(n, dtype=np.float64) * (num_train // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        return _trailing(num_train, num_train, n)
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; use one of {', '.join(SPACINGS)}")


def solver_timesteps(spacing: str, num_train: int, n: int, steps_offset: int = 0,
                     last_timestep: int | None = None) -> np.ndarray:
    """Descending grid of the multistep solvers: n + 1 points ending at t = 0, which is dropped."""
    last = num_train if last_timestep is None else last_timestep
    if spacing == "trailing":
        return _trailing(last, num_train, n)
    return spaced_timesteps(spacing, last, n + 1, steps_offset)[:-1]


def _trailing(start: int, num_train: int, n: int) -> np.ndarray:
    """round(arange(start, 0, -num_train / n)) - 1, cut to n points.

    For some n (61, 103, ...) float rounding makes diffusers' arange one longer, ending in
    timestep -1; those n get diffusers' first n timesteps here.
    """
    return np.round(np.arange(start, 0, -num_train / n))[:n] - 1


def interp_sigmas(timesteps: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps, linear in t over the training table."""
    return np.interp(timesteps, np.arange(len(table)), table)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, rho = 7 (Karras 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """sigma_i = exp(linspace(log max, log min, n)): uniform in log-sigma (k-diffusion get_sigmas_exponential)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """sigma_i = min + F⁻¹(1 - i/(n-1)) (max - min), F the Beta(a, b) CDF (Lee et al. 2024, sec. 3)."""
    q = 1 - np.linspace(0, 1, n)
    return sigma_min + beta_ppf(q, a, b) * (sigma_max - sigma_min)


def sigma_schedule(kind: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n descending sigmas of a named schedule: karras, exponential or beta."""
    if kind == "karras":
        return karras_sigmas(sigma_min, sigma_max, n)
    if kind == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, n)
    if kind == "beta":
        return beta_sigmas(sigma_min, sigma_max, n)
    raise ValueError(f"sigma schedule {kind!r} is not supported; use one of {', '.join(SIGMA_SCHEDULES)}")


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """Quantiles of Beta(a, b): I_x(a, b) = q solved by bisection to float64 resolution."""
    q = np.asarray(q, dtype=np.float64)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = betainc(mid, a, b) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, (lo + hi) / 2))


def betainc(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b) by its continued fraction, with I_x(a, b) = 1 - I_(1-x)(b, a)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    flip = x > (a + 1) / (a + b + 2)  # where the fraction converges slowly
    xs, aa, bb = np.where(flip, 1 - x, x), np.where(flip, b, a), np.where(flip, a, b)
    with np.errstate(divide="ignore"):
        front = np.exp(aa * np.log(xs) + bb * np.log1p(-xs) - _log_beta(a, b)) / aa
    out = front * _beta_fraction(xs, aa, bb)
    return np.where(flip, 1 - out, out)


def _log_beta(a: float, b: float) -> float:
    """log B(a, b) = log Γ(a) + log Γ(b) - log Γ(a + b)."""
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_fraction(x: np.ndarray, a: np.ndarray, b: np.ndarray, terms: int = 300) -> np.ndarray:
    """Continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes, sec. 6.4)."""
    def guard(v):
        return np.where(np.abs(v) < 1e-300, 1e-300, v)
    c, d = np.ones_like(x), 1 / guard(1 - (a + b) * x / (a + 1))
    f = d.copy()
    for m in range(1, terms):
        change = np.zeros_like(x)
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1 / guard(1 + num * d), guard(1 + num / c)
            f = f * c * d
            change = np.maximum(change, np.abs(c * d - 1))
        if change.max() < 1e-15:
            break
    return f


def sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation of log-sigma in the training table."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    dists = log_sigma - log_table[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
    high = low + 1
    lo, hi = log_table[low], log_table[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * high


def sigma_min_max(cfg_min: float | None, cfg_max: float | None, lo: float, hi: float) -> tuple[float, float]:
    """Karras range: the configured sigma_min / sigma_max, else the given schedule ends."""
    return (float(lo) if cfg_min is None else cfg_min), (float(hi) if cfg_max is None else cfg_max)


def half_log_snr(sigma: float) -> np.float64:
    """lambda = log(alpha_t / sigma_t) = -log(sigma) of a k-diffusion sigma (Lu et al. 2022); inf at sigma = 0.

    A NumPy scalar, so that a zero step size gives inf / nan as in torch rather than an exception.
    """
    s = float(sigma)
    return np.float64(math.inf if s == 0.0 else -math.log(s))


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only copy, so plans can share arrays safely."""
    out = np.array(a)
    out.flags.writeable = False
    return out
