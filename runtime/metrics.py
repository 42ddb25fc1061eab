"""The project's one definition of how close two arrays are: max abs error and PSNR."""
from __future__ import annotations

import numpy as np


def psnr(expected: np.ndarray, got: np.ndarray, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; peak defaults to the reference's value range (1.0 for [0, 1] images)."""
    diff = np.asarray(expected, np.float64) - np.asarray(got, np.float64)
    mse = float(np.mean(diff ** 2))
    if peak is None:
        peak = float(np.max(expected) - np.min(expected)) or 1.0
    return float("inf") if mse == 0 else float(10 * np.log10(peak * peak / mse))


def max_abs(expected: np.ndarray, got: np.ndarray) -> float:
    """Largest absolute element-wise difference."""
    return float(np.abs(np.asarray(expected, np.float64) - np.asarray(got, np.float64)).max())
