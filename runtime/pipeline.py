"""The generation pipeline: txt2img, img2img and inpainting, as diffusers' Stable Diffusion pipelines do them.

References: diffusers StableDiffusionPipeline / StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline
(prompt encoding, classifier-free guidance, latent preparation and the order of generator draws).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import images as imgs
from .conditioning import Conditioning, encode, uses_guidance
from .control import CONTROLLED_UNET, control_units, prepare as prepare_control
from .embeddings import TextualInversionMixin, embedding_view
from .errors import UserError
from .latents import Prepared, pasted_back
from .layout import TEXT_ENCODERS
from .model import Model, open_model
from .randn import BatchGenerator
from .request import GenerationRequest
from .schedulers import Scheduler, a1111_sampler, from_config

# (step, total, timestep, latents) -> True to stop after this step: the latents so far are decoded, as diffusers'
# `interrupt` does (a server's interrupt/skip); None or False to go on.
StepCallback = Callable[[int, int, float, np.ndarray], "bool | None"]


@dataclass
class PipelineOutput:
    """Images as PIL list, (N, H, W, 3) float array, or latents, per output_type."""
    images: object
    scheduler: str = ""          # the scheduler's registry name, e.g. "pndm"
    sampler: tuple = ("", None)  # (A1111 sampler, schedule type) for the infotext, e.g. ("DPM++ 2M", "Karras")


class StableDiffusionPipeline(TextualInversionMixin):
    """Runs an exported folder with onnxruntime + NumPy; the call mirrors diffusers' (textual inversion: the mixin)."""

    def __init__(self, model: Model, lora_dir=None):
        self.model = model
        self.lora_dir, self.lora_partial, self.loras, self._lora_cache = lora_dir, False, (), None

    # -- LoRA (runtime.lora): files merged into the graphs' weights at session build, cached per set ----------
    def load_lora(self, path, weight: float = 1.0) -> None:
        """Apply a LoRA file (or a name in `lora_dir`) to every following call, as diffusers' load + fuse."""
        from .lora.library import check_scale

        self.loras = self.loras + ((path, check_scale(path, weight)),)

    def unload_lora(self) -> None:
        """Stop applying the LoRA files given to load_lora."""
        self.loras = ()

    @property
    def lora_cache(self):
        """The merged-session cache (runtime.lora.LoraCache) of this pipeline's model."""
        if self._lora_cache is None:
            from .lora.apply import LoraCache
            self._lora_cache = LoraCache(self.model)
        return self._lora_cache

    @classmethod
    def from_pretrained(cls, folder, provider: str = "auto", threads: int = 0, verify: bool = True):
        """Open an exported folder (ours or Optimum's); an SD3 folder (transformer/) opens its own pipeline."""
        model = open_model(Path(folder), provider=provider, threads=threads, verify=verify)
        return pipeline_for(model) if cls is StableDiffusionPipeline else cls(model)

    # -- pieces ---------------------------------------------------------------------
    def unet_constants(self, cond: Conditioning) -> list:
        """The UNet inputs that stay the same for every step, per UNet call of a step, placed on the device once."""
        g = self.model.graph("unet")
        return [{k: g.on_device(k, g.cast(k, v)) for k, v in feeds.items()} for feeds in cond.passes()]

    def unet(self, latents: np.ndarray, t: float, constants: dict, channels: np.ndarray | None,
             residuals: dict | None = None) -> np.ndarray:
        """One UNet call; the timestep is shaped as the graph declares it (rank 0 or per batch). ControlNet
        residuals (runtime.control) go to the unet_controlled graph; without them the plain unet runs."""
        g = self.model.graph("unet" if residuals is None else CONTROLLED_UNET)
        x = latents if channels is None else np.concatenate([latents, channels], axis=1)
        ts = np.float32(t) if g.input_rank("timestep") == 0 else np.full((x.shape[0],), t, dtype=np.float32)
        extra = {k: g.cast(k, v) for k, v in (residuals or {}).items()}
        return g(sample=g.cast("sample", x), timestep=g.cast("timestep", ts), **constants, **extra)["out_sample"]

    def unet_passes(self, latents: np.ndarray, t: float, passes: list, channels: np.ndarray | None,
                    control=None) -> np.ndarray:
        """The UNet output for the whole batch: one call, or one per pass on equal batch slices (uncond, cond);
        `control` (runtime.control.Control.at(step)) gives each call its ControlNet residuals."""
        n = len(passes)
        if n == 1:
            return self.unet(latents, t, passes[0], channels, control and control(latents, t, 0, 1))
        xs = np.split(latents, n)                                                     # (B, C, h, w) each
        cs = [None] * n if channels is None else np.split(channels, n)
        return np.concatenate([self.unet(x, t, p, c, control and control(x, t, k, n))
                               for k, (x, p, c) in enumerate(zip(xs, passes, cs))])

    def encode_image(self, pixels: np.ndarray, gen, batch: int) -> np.ndarray:
        """VAE-encode (1, 3, H, W) pixels and sample scaled latents (batch, 4, h, w) from the generator."""
        enc = self.model.graph("vae_encoder")
        params = enc(sample=enc.cast("sample", pixels))["latent_parameters"]
        mean, logvar = np.split(params.astype(np.float32), 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        if isinstance(gen, BatchGenerator):
            draws = [mean + std * g.randn(mean.shape) for g in gen.generators]
            latents = np.concatenate(draws)
        else:
            latents = np.repeat(mean + std * gen.randn(mean.shape), batch, axis=0)
        facts = self.model.facts                          # SD3's VAE also shifts: (z - shift) * scale
        return ((latents - facts.shift_factor) * facts.scaling_factor).astype(np.float32)

    vae_tiling = None       # a runtime.vae_tiling.VaeTiling: decode large latents in overlapping tiles

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> (N, H, W, 3) float images in [0, 1], one image at a time (or tile, see vae_tiling)."""
        if self.model.one_shot:       # encoders and denoiser are done: free them before the decoder's activations
            self.model.release(keep=("vae_decoder",))
        dec = self.model.graph("vae_decoder")
        scaled = latents / self.model.facts.scaling_factor + self.model.facts.shift_factor

        def run(z):
            return dec(latent_sample=dec.cast("latent_sample", z))["sample"]
        if self.vae_tiling is not None:
            out = np.concatenate([self.vae_tiling.decode(scaled[i:i + 1], run, self.model.facts.vae_scale_factor)
                                  for i in range(len(scaled))])
        else:
            out = np.concatenate([run(scaled[i:i + 1]) for i in range(len(scaled))])
        if not np.isfinite(out).all():
            raise UserError("the VAE decoder produced NaN/Inf (fp16 overflow in vae_decoder?); "
                            "export with the VAE kept in fp32")
        return imgs.postprocess(out)

    # -- the call -------------------------------------------------------------------
    def __call__(self, prompt, negative_prompt=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 num_images_per_prompt: int | None = None, generator=None, seed=None,
                 latents: np.ndarray | None = None, image=None, mask_image=None, strength: float | None = None,
                 scheduler=None, output_type: str | None = None, prompt_syntax: str | None = None,
                 inpaint=None, callback: StepCallback | None = None, clip_skip: int | None = None,
                 control_image=None, controlnet_conditioning_scale=None, control_guidance_start=None,
                 control_guidance_end=None, guess_mode: bool | None = None, loras=None) -> PipelineOutput:
        """Generate images; `image` switches to img2img, `image` + `mask_image` to inpainting.
        `loras` {file or name: weight} merges LoRA files for this call (see load_lora for every call).

        None means diffusers' default (runtime.request.DEFAULTS; strength 0.8 for img2img, 1.0 otherwise).
        `scheduler` is a name (see runtime.schedulers.scheduler_names), a Scheduler, or None for the folder's own.
        `prompt_syntax` "plain" (default: literal prompts, as diffusers) or "a1111" (weights, BREAK, long prompts).
        `clip_skip` is A1111's "Clip skip" (1: the last layer; diffusers' clip_skip=k is clip_skip=k+1 here).
        `inpaint` (runtime.a1111.inpaint.InpaintOptions) applies A1111's mask blur, crop and fill to inpainting.
        `control_image` (one image, or a list: one per exported ControlNet, in order) with the ControlNet arguments
        as diffusers names them; diffusers' ControlNet txt2img pipeline calls it `image`, which is img2img's here.
        """
        request = GenerationRequest.create(
            prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, latents=latents, image=image,
            mask_image=mask_image, strength=strength, scheduler=scheduler, output_type=output_type,
            prompt_syntax=prompt_syntax, inpaint=inpaint, clip_skip=clip_skip, guess_mode=guess_mode,
            controls=control_units(control_image, controlnet_conditioning_scale, control_guidance_start,
                                   control_guidance_end), loras=loras)
        return self.run(request, generator=generator, callback=callback)

    def run(self, request: GenerationRequest, generator=None, callback: StepCallback | None = None) -> PipelineOutput:
        """Generate what `request` asks for; `generator` (a runtime.randn generator) overrides its seed."""
        from .lora import lora_view
        view, r = lora_view(self, request)             # <lora:x:w> tags out of the prompt; merged graphs
        if view is not self:
            return view.run(r, generator=generator, callback=callback)
        view = embedding_view(self, r)                 # text encoders that know the embeddings the prompts use
        if view is not self:
            return view.run(r, generator=generator, callback=callback)
        height, width = self._size(r)
        self.model.check_size(height, width)
        prep = None
        if r.inpaint is not None:            # A1111 mask handling: blur, crop, fill; pasted back after decoding
            from .a1111.inpaint import prepare
            prep = prepare(r.image, r.mask_image, width, height, r.inpaint)
            r = replace(r, image=prep.image, mask_image=prep.mask)
        self.model.check_shape(r.total_images, height, width)
        gen = generator or r.generator()
        sched, plan = self._schedule(r)
        start = sched.img2img_start(plan, r.effective_strength) if r.image is not None else 0
        if start >= len(plan.timesteps):
            raise UserError(f"strength {r.effective_strength} with {r.num_inference_steps} steps leaves no "
                            "denoising step")
        cond = encode(self.model, list(r.prompt), r.negative_prompt, r.num_images_per_prompt, height, width,
                      r.guidance_scale, r.prompt_syntax, r.clip_skip)
        if self.model.one_shot:         # the text encoders are done: free them before the denoiser's activations
            self.model.release(only=tuple(e for e, _ in TEXT_ENCODERS))
        f = self.model.facts.vae_scale_factor
        shape = (r.total_images, self.model.facts.latent_channels, height // f, width // f)
        state = Prepared.build(self, r, sched, plan, start, gen, shape, prep)
        control = prepare_control(self.model, r, cond.passes(), uses_guidance(self.model, r.guidance_scale),
                                  (height, width), len(plan.timesteps) - start)
        x = self._denoise(r, sched, plan, start, state, self.unet_constants(cond), gen, callback, control)
        names = sched.name, a1111_sampler(sched)
        if r.output_type == "latent":
            return PipelineOutput(x, *names)
        decoded = self.decode(x)
        if prep is not None:
            decoded = pasted_back(decoded, prep)
        if r.output_type == "np":
            return PipelineOutput(decoded, *names)
        from PIL import Image
        return PipelineOutput([Image.fromarray(a) for a in imgs.to_uint8(decoded)], *names)

    def _schedule(self, r: GenerationRequest) -> tuple:
        """The request's scheduler (or the folder's) and its plan for the requested steps."""
        try:
            sched = r.scheduler if isinstance(r.scheduler, Scheduler) else from_config(
                self.model.facts.scheduler_config, r.scheduler)
            return sched, sched.plan(r.num_inference_steps)
        except ValueError as e:
            raise UserError(str(e)) from None

    def _denoise(self, r, sched, plan, start: int, state: Prepared, constants: list, gen, callback,
                 control=None) -> np.ndarray:
        """The denoising loop from step `start`, with classifier-free guidance when it applies."""
        cfg = uses_guidance(self.model, r.guidance_scale)
        x, sstate, steps = state.latents, sched.init_state(plan), len(plan.timesteps) - start
        for n, i in enumerate(range(start, len(plan.timesteps))):
            t = float(plan.timesteps[i])
            x_in = sched.scale_model_input(plan, i, np.concatenate([x, x]) if cfg else x)      # (2B or B, C, h, w)
            eps = self.unet_passes(x_in, t, constants, state.unet_extra(cfg), control and control.at(n))
            if cfg:
                uncond, text = np.split(eps, 2)
                eps = uncond + r.guidance_scale * (text - uncond)
            x, sstate = sched.step(plan, sstate, i, eps, x, gen.randn)
            x = state.blend(sched, plan, i, x)
            if not np.isfinite(x).all():
                raise UserError(f"latents became NaN/Inf at step {n + 1} (fp16 overflow in the unet?)")
            if callback and callback(n + 1, steps, t, x):
                break                          # asked to stop: decode what there is
        return x

    def _size(self, r: GenerationRequest) -> tuple[int, int]:
        """Requested size, else the init (or first control) image's, rounded down to multiples of 8, else the
        model's default."""
        source = r.image if r.image is not None else r.controls[0].image if r.controls else None
        if r.height is None and r.width is None and source is not None:
            w, h = imgs.to_pil(source).size
            f = self.model.facts.vae_scale_factor
            return h // f * f, w // f * f
        d = self.model.facts.default_size
        return int(r.height or d), int(r.width or d)


def pipeline_for(model: Model) -> StableDiffusionPipeline:
    """The pipeline of an opened folder, by its layout: SD3's for transformer/ (runtime.sd3_pipeline), else this."""
    if model.facts.denoiser == "transformer":
        from .sd3_pipeline import StableDiffusion3Pipeline
        return StableDiffusion3Pipeline(model)
    return StableDiffusionPipeline(model)
