"""Stable Diffusion 3.x: MMDiT transformer, flow matching, CLIP-L + CLIP-G + optional T5, as diffusers runs it.

Chosen by the folder's layout (transformer/ instead of unet/: StableDiffusionPipeline.from_pretrained opens this).
References: diffusers StableDiffusion3Pipeline (__call__: latents, calculate_shift, classifier-free guidance,
decoding with the VAE's shift_factor) and StableDiffusion3Img2ImgPipeline (get_timesteps; prepare_latents:
encode, shift and scale, then scale_noise to the first step's sigma).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import images as imgs
from .errors import UserError
from .layout import T5_ENCODER
from .model import Model, open_model
from .pipeline import PipelineOutput, StableDiffusionPipeline, StepCallback
from .request import DEFAULTS, SD3_DEFAULTS, GenerationRequest
from .schedulers import Scheduler, a1111_sampler, from_config
from .schedulers.flow_match import FlowMatchScheduler, resolution_mu
from .sd3_conditioning import SD3Prompts, encode_sd3


class StableDiffusion3Pipeline(StableDiffusionPipeline):
    """Runs an exported SD3 folder with onnxruntime + NumPy; the call mirrors diffusers' StableDiffusion3Pipeline."""

    def __init__(self, model: Model, text_encoder_3: bool = True):
        super().__init__(model)
        self.use_t5 = bool(text_encoder_3) and model.has(T5_ENCODER[0])   # no T5: zeros in its place, as diffusers

    @classmethod
    def from_pretrained(cls, folder, provider: str = "auto", threads: int = 0, verify: bool = True,
                        text_encoder_3=True):
        """Open an exported SD3 folder; `text_encoder_3=None` leaves T5 out, as diffusers' from_pretrained does."""
        model = open_model(Path(folder), provider=provider, threads=threads, verify=verify)
        if model.facts.denoiser != "transformer":
            raise UserError(f"{folder} has no transformer/ graph (not an SD3 export); "
                            "open it with runtime.pipeline.StableDiffusionPipeline")
        return cls(model, text_encoder_3=text_encoder_3 is not None and text_encoder_3 is not False)

    def __call__(self, prompt, prompt_2=None, prompt_3=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt: int | None = None,
                 generator=None, seed=None, latents: np.ndarray | None = None, image=None,
                 strength: float | None = None, scheduler=None, output_type: str | None = None,
                 max_sequence_length: int = 256, callback: StepCallback | None = None) -> PipelineOutput:
        """Generate images (txt2img; img2img with `image`). None means StableDiffusion3Pipeline's default
        (28 steps, guidance 7.0, strength 0.6 for img2img); `scheduler` as in StableDiffusionPipeline."""
        request = GenerationRequest.create(
            prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=SD3_DEFAULTS["num_inference_steps"] if num_inference_steps is None
            else num_inference_steps,
            guidance_scale=SD3_DEFAULTS["guidance_scale"] if guidance_scale is None else guidance_scale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, latents=latents, image=image,
            strength=strength, scheduler=scheduler, output_type=output_type)
        prompts = SD3Prompts(prompt_2, prompt_3, negative_prompt_2, negative_prompt_3, max_sequence_length)
        return self.run(request, generator=generator, callback=callback, prompts=prompts)

    def run(self, request: GenerationRequest, generator=None, callback: StepCallback | None = None,
            prompts: SD3Prompts | None = None) -> PipelineOutput:
        """Generate what `request` asks for; `prompts` adds SD3's prompt_2/prompt_3 and max_sequence_length."""
        r, p = request, prompts or SD3Prompts()
        _check_request(r)
        facts = self.model.facts
        height, width = self._size(r)
        f = facts.vae_scale_factor
        self.model.check_size(height, width)                        # whole transformer patches
        self.model.check_shape(r.total_images, height, width)
        gen = generator or r.generator()
        sched, plan = self._flow_schedule(r, height // f, width // f)
        strength = SD3_DEFAULTS["strength"] if r.strength is None else r.strength
        start = sched.img2img_start(plan, strength) if r.image is not None else 0
        if start >= len(plan.timesteps):
            raise UserError(f"strength {strength} with {r.num_inference_steps} steps leaves no denoising step")
        guided = r.guidance_scale > 1.0
        states, pooled = encode_sd3(self.model, r.prompt, r.negative_prompt, p, r.num_images_per_prompt, guided,
                                    self.use_t5)
        shape = (r.total_images, facts.latent_channels, height // f, width // f)
        x = self._initial_latents(r, sched, plan, start, gen, shape)
        x = self._flow_loop(r, sched, plan, start, x, states, pooled, gen, callback)
        return self._output(x, sched, r.output_type)

    def _size(self, r: GenerationRequest) -> tuple[int, int]:
        """The requested size, else the model's default (SD3 img2img too resizes the image to it, as diffusers)."""
        d = self.model.facts.default_size
        return int(r.height or d), int(r.width or d)

    def _flow_schedule(self, r: GenerationRequest, latent_h: int, latent_w: int) -> tuple:
        """The request's (or the folder's) flow-matching scheduler and its plan; mu from the image's token count."""
        try:
            sched = r.scheduler if isinstance(r.scheduler, Scheduler) else from_config(
                self.model.facts.scheduler_config, r.scheduler)
            if not isinstance(sched, FlowMatchScheduler):
                raise ValueError(f"scheduler {sched.name!r} is not a flow-matching scheduler; SD3 models need "
                                 "flow-euler or flow-heun")
            options = {}
            if sched.config.use_dynamic_shifting:
                patch = self.model.facts.patch_size
                options["mu"] = resolution_mu(sched.config, (latent_h // patch) * (latent_w // patch))
            return sched, sched.plan(r.num_inference_steps, **options)
        except ValueError as e:
            raise UserError(str(e)) from None

    def _initial_latents(self, r: GenerationRequest, sched, plan, start: int, gen, shape: tuple) -> np.ndarray:
        """Noise (B, 16, h, w); img2img: the image's latents noised to the first step's sigma, in diffusers'
        generator order (VAE sample, then noise). Given latents are used as they are, as diffusers does."""
        if r.latents is not None:
            latents = np.asarray(r.latents, dtype=np.float32)
            if latents.shape != shape:
                raise UserError(f"latents have shape {list(latents.shape)}, this request needs {list(shape)}")
            return latents
        if r.image is None:
            return np.asarray(gen.randn(shape), dtype=np.float32)
        f = self.model.facts.vae_scale_factor
        pixels = imgs.preprocess_image(r.image, shape[3] * f, shape[2] * f)                # (1, 3, H, W)
        init = self.encode_image(pixels, gen, shape[0])                                   # (B, 16, h, w)
        return sched.add_noise(plan, start, init, gen.randn(shape))

    def _flow_loop(self, r, sched, plan, start: int, x, states, pooled, gen, callback) -> np.ndarray:
        """The denoising loop: velocity from the transformer (both halves at once with guidance), scheduler step."""
        g = self.model.graph("transformer")
        constants = {"encoder_hidden_states": g.on_device("encoder_hidden_states", states),
                     "pooled_projections": g.on_device("pooled_projections", pooled)}
        guided, steps, sstate = len(states) != len(x), len(plan.timesteps) - start, sched.init_state(plan)
        for n, i in enumerate(range(start, len(plan.timesteps))):
            t = float(plan.timesteps[i])
            x_in = np.concatenate([x, x]) if guided else x                                # (2B or B, C, h, w)
            ts = np.full((len(x_in),), t, dtype=np.float32)                               # t.expand(batch)
            v = g(hidden_states=g.cast("hidden_states", x_in), timestep=g.cast("timestep", ts),
                  **constants)["out_hidden_states"]
            if guided:
                uncond, text = np.split(v, 2)
                v = uncond + r.guidance_scale * (text - uncond)
            x, sstate = sched.step(plan, sstate, i, v, x, gen.randn)
            if not np.isfinite(x).all():
                raise UserError(f"latents became NaN/Inf at step {n + 1} (fp16 overflow in the transformer?)")
            if callback and callback(n + 1, steps, t, x):
                break                          # asked to stop: decode what there is
        return x

    def _output(self, x: np.ndarray, sched, output_type: str) -> PipelineOutput:
        """Latents, or decoded images as (N, H, W, 3) floats or PIL images, with the scheduler's names."""
        names = sched.name, a1111_sampler(sched)
        if output_type == "latent":
            return PipelineOutput(x, *names)
        decoded = self.decode(x)
        if output_type == "np":
            return PipelineOutput(decoded, *names)
        from PIL import Image
        return PipelineOutput([Image.fromarray(a) for a in imgs.to_uint8(decoded)], *names)


def _check_request(r: GenerationRequest) -> None:
    """Refuse what the SD3 pipeline does not do, in one line each."""
    unsupported = [("inpainting (--mask)", r.mask_image is not None),
                   ("A1111 prompt syntax", r.prompt_syntax != DEFAULTS["prompt_syntax"]),
                   ("clip skip", getattr(r, "clip_skip", 1) != 1),
                   ("ControlNet", bool(getattr(r, "controls", ()))), ("LoRA", bool(getattr(r, "loras", ())))]
    names = [name for name, used in unsupported if used]
    if names:
        raise UserError(f"SD3 models do not support {', '.join(names)} in this runtime yet")
