"""The generation pipeline: txt2img, img2img and inpainting, as diffusers' Stable Diffusion pipelines do them.

References: diffusers StableDiffusionPipeline / StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline
(prompt encoding, classifier-free guidance, latent preparation and the order of generator draws).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import images as imgs
from .conditioning import Conditioning, encode, uses_guidance
from .errors import UserError
from .model import Model, open_model
from .randn import BatchGenerator, make_generator
from .schedulers import Scheduler, from_config

StepCallback = Callable[[int, int, float, np.ndarray], None]   # (step, total, timestep, latents)


@dataclass
class PipelineOutput:
    """Images as PIL list, (N, H, W, 3) float array, or latents, per output_type."""
    images: object
    scheduler: str = ""          # the scheduler's registry name, e.g. "pndm"


def _as_list(x) -> list:
    """A prompt or list of prompts as a list."""
    return [x] if isinstance(x, str) else list(x or [])


class StableDiffusionPipeline:
    """Runs an exported folder with onnxruntime + NumPy; the call mirrors diffusers'."""

    def __init__(self, model: Model):
        self.model = model

    @classmethod
    def from_pretrained(cls, folder, provider: str = "auto", threads: int = 0, verify: bool = True):
        """Open an exported folder (ours or Optimum's)."""
        return cls(open_model(Path(folder), provider=provider, threads=threads, verify=verify))

    # -- pieces ---------------------------------------------------------------------
    def unet_constants(self, cond: Conditioning) -> dict:
        """The UNet inputs that stay the same for every step, placed on the device once."""
        g = self.model.graph("unet")
        return {k: g.on_device(k, v) for k, v in ({"encoder_hidden_states": cond.embeds} | cond.extra).items()}

    def unet(self, latents: np.ndarray, t: float, constants: dict, channels: np.ndarray | None) -> np.ndarray:
        """One UNet call; the timestep is shaped as the graph declares it (rank 0 or per batch)."""
        g = self.model.graph("unet")
        x = latents if channels is None else np.concatenate([latents, channels], axis=1)
        ts = np.float32(t) if g.input_rank("timestep") == 0 else np.full((x.shape[0],), t, dtype=np.float32)
        return g(sample=x, timestep=ts, **constants)["out_sample"]

    def encode_image(self, pixels: np.ndarray, gen, batch: int) -> np.ndarray:
        """VAE-encode (1, 3, H, W) pixels and sample scaled latents (batch, 4, h, w) from the generator."""
        params = self.model.graph("vae_encoder")(sample=pixels)["latent_parameters"]
        mean, logvar = np.split(params.astype(np.float32), 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        if isinstance(gen, BatchGenerator):
            draws = [mean + std * g.randn(mean.shape) for g in gen.generators]
            latents = np.concatenate(draws)
        else:
            latents = np.repeat(mean + std * gen.randn(mean.shape), batch, axis=0)
        return (latents * self.model.facts.scaling_factor).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> (N, H, W, 3) float images in [0, 1], one image at a time to bound memory."""
        dec = self.model.graph("vae_decoder")
        scaled = latents / self.model.facts.scaling_factor
        out = np.concatenate([dec(latent_sample=scaled[i:i + 1])["sample"] for i in range(len(scaled))])
        if not np.isfinite(out).all():
            raise UserError("the VAE decoder produced NaN/Inf (fp16 overflow in vae_decoder?); "
                            "export with the VAE kept in fp32")
        return imgs.postprocess(out)

    # -- the call -------------------------------------------------------------------
    def __call__(self, prompt, negative_prompt=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                 generator=None, seed=None, latents: np.ndarray | None = None, image=None, mask_image=None,
                 strength: float = 1.0, scheduler=None, output_type: str = "pil",
                 callback: StepCallback | None = None) -> PipelineOutput:
        """Generate images; `image` switches to img2img, `image` + `mask_image` to inpainting.

        `scheduler` is a name (see runtime.schedulers.scheduler_names), a Scheduler, or None for the folder's own.
        """
        prompts = _as_list(prompt)
        total = len(prompts) * num_images_per_prompt
        height, width = self._size(height, width, image)
        self._check_args(prompts, num_inference_steps, guidance_scale, strength, output_type, image, mask_image,
                         height, width)
        self.model.check_shape(total, height, width)
        gen = generator or make_generator(0 if seed is None else seed, batch=total if isinstance(seed, list) else None)
        try:
            sched = scheduler if isinstance(scheduler, Scheduler) else from_config(
                self.model.facts.scheduler_config, scheduler)
            plan = sched.plan(num_inference_steps)
        except ValueError as e:
            raise UserError(str(e)) from None
        start = sched.img2img_start(plan, strength) if image is not None else 0
        if start >= len(plan.timesteps):
            raise UserError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step")
        cfg = uses_guidance(self.model, guidance_scale)
        cond = encode(self.model, prompts, negative_prompt, num_images_per_prompt, height, width, guidance_scale)
        constants = self.unet_constants(cond)
        f = self.model.facts.vae_scale_factor
        shape = (total, self.model.facts.latent_channels, height // f, width // f)
        state = _Prepared.build(self, sched, plan, start, gen, shape, latents, image, mask_image, width, height)
        x = state.latents
        steps = len(plan.timesteps) - start
        sstate = sched.init_state(plan)
        for n, i in enumerate(range(start, len(plan.timesteps))):
            t = float(plan.timesteps[i])
            x_in = sched.scale_model_input(plan, i, np.concatenate([x, x]) if cfg else x)
            extra = state.unet_extra(cfg)
            eps = self.unet(x_in, t, constants, extra)
            if cfg:
                uncond, text = np.split(eps, 2)
                eps = uncond + guidance_scale * (text - uncond)
            x, sstate = sched.step(plan, sstate, i, eps, x, gen.randn)
            x = state.blend(sched, plan, i, x)
            if not np.isfinite(x).all():
                raise UserError(f"latents became NaN/Inf at step {n + 1} (fp16 overflow in the unet?)")
            if callback:
                callback(n + 1, steps, t, x)
        if output_type == "latent":
            return PipelineOutput(x, sched.name)
        decoded = self.decode(x)
        if output_type == "np":
            return PipelineOutput(decoded, sched.name)
        from PIL import Image
        return PipelineOutput([Image.fromarray(a) for a in imgs.to_uint8(decoded)], sched.name)

    def _size(self, height, width, image) -> tuple[int, int]:
        """Requested size, else the init image's (rounded down to multiples of 8), else the model's default."""
        if height is None and width is None and image is not None:
            w, h = imgs.to_pil(image).size
            f = self.model.facts.vae_scale_factor
            return h // f * f, w // f * f
        d = self.model.facts.default_size
        return int(height or d), int(width or d)

    def _check_args(self, prompts, steps, guidance, strength, output_type, image, mask, height, width) -> None:
        """Reject bad arguments with one-line errors, before any graph runs."""
        if not prompts:
            raise UserError("no prompt given")
        if not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise UserError(f"steps must be an integer in [1, 1000], got {steps!r}")
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise UserError(f"guidance must be a finite number >= 0, got {guidance!r}")
        if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise UserError(f"strength must be in [0, 1], got {strength!r}")
        if output_type not in ("pil", "np", "latent"):
            raise UserError(f"output_type must be pil, np or latent, got {output_type!r}")
        if mask is not None and image is None:
            raise UserError("a mask needs an init image (--init-image)")
        f = self.model.facts.vae_scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise UserError(f"width and height must be positive multiples of {f}, got {width}x{height}")


@dataclass
class _Prepared:
    """Initial latents plus what img2img/inpainting needs inside the loop."""
    latents: np.ndarray
    mask: np.ndarray | None = None              # (B, 1, h, w), 1 = repaint
    masked_latents: np.ndarray | None = None    # 9-channel UNets: the masked image's latents
    image_latents: np.ndarray | None = None     # 4-channel UNets: the clean image, re-noised each step
    noise: np.ndarray | None = None

    @staticmethod
    def build(pipe, sched, plan, start, gen, shape, latents, image, mask_image, width, height) -> "_Prepared":
        """Draw the initial latents in diffusers' generator order for the requested mode."""
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != shape:
                raise UserError(f"latents have shape {list(latents.shape)}, this request needs {list(shape)}")
        if image is None:
            noise = gen.randn(shape) if latents is None else latents
            return _Prepared((noise * plan.init_noise_sigma).astype(np.float32))
        pixels = imgs.preprocess_image(image, width, height)
        if mask_image is None:
            init = pipe.encode_image(pixels, gen, shape[0])
            noise = gen.randn(shape) if latents is None else latents
            return _Prepared(sched.add_noise(plan, start, init, noise))
        return _Prepared._inpaint(pipe, sched, plan, start, gen, shape, latents, pixels, mask_image, width, height)

    @staticmethod
    def _inpaint(pipe, sched, plan, start, gen, shape, latents, pixels, mask_image, width, height) -> "_Prepared":
        """StableDiffusionInpaintPipeline.prepare_latents + prepare_mask_latents."""
        nine = pipe.model.facts.unet_in_channels == 9
        full = start == 0
        image_latents = None
        if not nine or (latents is None and not full):
            image_latents = pipe.encode_image(pixels, gen, shape[0])
        if latents is None:
            noise = gen.randn(shape)
            x = noise * plan.init_noise_sigma if full else sched.add_noise(plan, start, image_latents, noise)
        else:
            noise, x = latents, latents * plan.init_noise_sigma
        mask = imgs.preprocess_mask(mask_image, width, height)
        masked = pipe.encode_image(pixels * (mask < 0.5), gen, shape[0])
        f = pipe.model.facts.vae_scale_factor
        small = np.repeat(mask[:, :, ::f, ::f], shape[0], axis=0)             # nearest, as F.interpolate
        return _Prepared(x.astype(np.float32), small, masked, None if nine else image_latents, noise)

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
