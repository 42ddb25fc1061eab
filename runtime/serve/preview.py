"""Live previews for /sdapi/v1/progress: A1111's "Approx cheap" latent -> RGB projection, no VAE run.

Reference: A1111 modules/sd_vae_approx.py cheap_approximation (a fixed 4x3 matrix per latent space, SD 1.x/2.x
and SDXL) and sd_samplers_common.single_sample_to_image (x * 0.5 + 0.5, clipped). The preview is at latent
resolution, as A1111's.
"""
from __future__ import annotations

import numpy as np

SD_COEFS = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                     [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], dtype=np.float32)
SDXL_COEFS = np.array([[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250],
                       [0.1074, 0.0886, -0.0163], [-0.3730, -0.2499, -0.2088]], dtype=np.float32)


def coefficients(model) -> np.ndarray | None:
    """The projection for a model's latents: SDXL's when its UNet takes time_ids, None unless 4 channels."""
    if model.facts.latent_channels != 4:
        return None
    return SDXL_COEFS if "time_ids" in model.graph("unet").inputs else SD_COEFS


def preview_png(latents: np.ndarray, coefs: np.ndarray) -> bytes:
    """The first image of (B, 4, h, w) latents as an (h, w) RGB PNG."""
    from .payload_images import png_bytes

    rgb = np.einsum("chw,cr->hwr", np.asarray(latents[0], dtype=np.float32), coefs)     # (h, w, 3)
    return png_bytes((np.clip(rgb * 0.5 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8))
