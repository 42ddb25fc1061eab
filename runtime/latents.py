"""Initial latents for txt2img, img2img and inpainting in diffusers' generator order, the inpainting blend inside
the loop, and A1111's paste-back of the unmasked pixels after decoding.

References: diffusers StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline (prepare_latents,
prepare_mask_latents, the 4-channel blend); A1111's inpainting overlay (runtime.a1111.inpaint).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import images as imgs
from .errors import UserError
from .request import GenerationRequest


def pasted_back(decoded: np.ndarray, prep) -> np.ndarray:
    """Each generated image (N, h, w, 3) put back into the original with its unmasked pixels: (N, H, W, 3)."""
    from .a1111.inpaint import paste_back

    pasted = [np.asarray(paste_back(a, prep), dtype=np.float32) / 255.0 for a in imgs.to_uint8(decoded)]
    return np.stack(pasted)


@dataclass
class Prepared:
    """Initial latents plus what img2img/inpainting needs inside the loop."""
    latents: np.ndarray
    mask: np.ndarray | None = None              # (B, 1, h, w), 1 = repaint
    masked_latents: np.ndarray | None = None    # 9-channel UNets: the masked image's latents
    image_latents: np.ndarray | None = None     # 4-channel UNets: the clean image, re-noised each step
    noise: np.ndarray | None = None

    @staticmethod
    def build(pipe, r: GenerationRequest, sched, plan, start: int, gen, shape: tuple, prep=None) -> "Prepared":
        """Draw the initial latents (shape (B, C, h, w)) in diffusers' generator order for the request's mode."""
        latents = None
        if r.latents is not None:
            latents = np.asarray(r.latents, dtype=np.float32)     # diffusers moves user latents to the model dtype
            if latents.shape != shape:
                raise UserError(f"latents have shape {list(latents.shape)}, this request needs {list(shape)}")
        if r.image is None:
            noise = gen.randn(shape) if latents is None else latents
            return Prepared((noise * plan.init_noise_sigma).astype(np.float32))
        f = pipe.model.facts.vae_scale_factor
        pixels = imgs.preprocess_image(r.image, shape[3] * f, shape[2] * f)               # (1, 3, H, W)
        if r.mask_image is None:
            init = pipe.encode_image(pixels, gen, shape[0])
            noise = gen.randn(shape) if latents is None else latents
            return Prepared(sched.add_noise(plan, start, init, noise))
        mask = imgs.preprocess_mask(r.mask_image, shape[3] * f, shape[2] * f)             # (1, 1, H, W)
        return Prepared._inpaint(pipe, sched, plan, start, gen, shape, latents, pixels, mask, prep)

    @staticmethod
    def _inpaint(pipe, sched, plan, start, gen, shape, latents, pixels, mask, prep=None) -> "Prepared":
        """StableDiffusionInpaintPipeline.prepare_latents + prepare_mask_latents; `prep`: A1111's latent fills."""
        nine = pipe.model.facts.unet_in_channels == 9
        latent_fill = prep is not None and prep.fill in (2, 3)
        full = start == 0 and not latent_fill          # latent fills start from the (filled) image, as A1111
        image_latents = None
        if not nine or latent_fill or (latents is None and not full):
            image_latents = pipe.encode_image(pixels, gen, shape[0])
        if latent_fill:
            from .a1111.inpaint import initial_latents
            lmask = prep.latent_mask(shape[2], shape[3])                   # (1, 1, h, w)
            randn = gen.randn(shape) if prep.fill == 2 else None
            image_latents = initial_latents(image_latents, lmask, prep.fill, randn).astype(np.float32)
        if latents is None:
            noise = gen.randn(shape)
            x = noise * plan.init_noise_sigma if full else sched.add_noise(plan, start, image_latents, noise)
        else:
            noise, x = latents, latents * plan.init_noise_sigma
        masked = pipe.encode_image(pixels * (mask < 0.5), gen, shape[0])
        f = pipe.model.facts.vae_scale_factor
        small = np.repeat(mask[:, :, ::f, ::f], shape[0], axis=0)             # nearest, as F.interpolate
        return Prepared(x.astype(np.float32), small, masked, None if nine else image_latents, noise)

    def unet_extra(self, cfg: bool) -> np.ndarray | None:
        """Extra UNet input channels (mask, masked latents) for 9-channel inpainting UNets."""
        if self.masked_latents is None or self.image_latents is not None:
            return None
        extra = np.concatenate([self.mask, self.masked_latents], axis=1)
        return np.concatenate([extra, extra]) if cfg else extra

    def blend(self, sched, plan, i: int, x: np.ndarray) -> np.ndarray:
        """4-channel inpainting: keep the unmasked region on the clean image's noise trajectory."""
        if self.image_latents is None:
            return x
        proper = self.image_latents
        if i + 1 < len(plan.timesteps):
            proper = sched.add_noise(plan, i + 1, proper, self.noise)
        return ((1 - self.mask) * proper + self.mask * x).astype(np.float32)
