"""Running a Plan on the loaded pipeline, and the A1111 response: PNGs with infotexts, `parameters`, `info`.

Reference: A1111 modules/processing.py process_images_inner (n_iter batches; interrupt ends the job, skip the
batch; each image's infotext in its PNG's `parameters` chunk) and Processed.js (the `info` JSON string). The
infotext is written by runtime.images.a1111_parameters, with the same fields `runtime generate` adds, so a PNG
from this server and one from the CLI with the same settings are the same picture with the same text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

from ..images import a1111_parameters, syntax_fields, to_uint8
from .payload_images import png_bytes
from .preview import coefficients, preview_png


@dataclass
class Outcome:
    """Images made for one request (PNG bytes with their infotexts) and the sampler they name."""
    images: list
    infotexts: list
    sampler: tuple = ("", None)        # (A1111 sampler, schedule type)


def infotext(request, sampler: tuple, seed, width: int, height: int, model_name: str) -> str:
    """One image's `parameters` text, with the fields `runtime generate` adds to it."""
    noted = syntax_fields((request.prompt[0], request.negative_prompt or ""), request.prompt_syntax)
    if request.image is not None:
        noted["Denoising strength"] = request.effective_strength
    if request.clip_skip > 1:
        noted["Clip skip"] = request.clip_skip
    return a1111_parameters(request.prompt[0], request.negative_prompt or "", request.num_inference_steps, sampler,
                            request.guidance_scale, seed, width, height, model_name, noted)


def image_seeds(request) -> list:
    """The seed of each image of a request (one seed for the batch, or one per image)."""
    seed = 0 if request.seed is None else request.seed
    return list(seed) if isinstance(seed, tuple) else [seed] * request.total_images


def run_requests(requests, scheduler: tuple, entry, registry, job) -> Outcome:
    """Run each request (one batch each) on entry's pipeline, reporting to job; PNGs with infotexts out."""
    from ..schedulers import from_config

    pipe, guard = registry.pipeline(entry)
    coefs = coefficients(pipe.model)
    if coefs is not None:
        job.preview = lambda latents: preview_png(latents, coefs)
    sched = None if scheduler is None else from_config(pipe.model.facts.scheduler_config, scheduler[0],
                                                       **scheduler[1])
    outcome = Outcome([], [])
    for n, request in enumerate(requests):
        if not job.next_batch(n):
            break
        run = request if sched is None else replace(request, scheduler=sched)
        if registry.batcher is not None:                 # runtime.serve.batching: may share a call with others
            out = registry.batcher.run(pipe, guard, run, job.step)
        else:
            with guard:
                out = pipe.run(run, callback=job.step)
        outcome.sampler = out.sampler
        for pixels, seed in zip(to_uint8(out.images), image_seeds(request)):
            text = infotext(request, out.sampler, seed, pixels.shape[1], pixels.shape[0], entry.name)
            outcome.images.append(png_bytes(pixels, text))
            outcome.infotexts.append(text)
    return outcome


def run_plan(plan, registry, job) -> Outcome:
    """A Plan's batches on its model; the model stays current when the request asked for that."""
    outcome = run_requests(plan.requests, plan.scheduler, plan.entry, registry, job)
    if plan.keep_model:
        registry.switch(plan.entry.name)
    return outcome


def echoed_parameters(body) -> dict:
    """`parameters`: the request as A1111 read it, init images and mask left out unless include_init_images."""
    params = body.model_dump()
    if not params.get("include_init_images", True):
        params["init_images"] = params["mask"] = None
    return params


def info_json(plan, outcome: Outcome, job, version: str) -> str:
    """Processed.js(): the `info` string of a txt2img/img2img response."""
    body, total = plan.body, len(plan.seeds)
    sampler, schedule = outcome.sampler if outcome.sampler[0] else (body.sampler_name or body.sampler_index, None)
    facts = plan.entry.facts
    return json.dumps({
        "prompt": body.prompt, "all_prompts": [body.prompt] * total, "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * total, "seed": plan.seeds[0], "all_seeds": list(plan.seeds),
        "subseed": plan.subseeds[0], "all_subseeds": list(plan.subseeds), "subseed_strength": body.subseed_strength,
        "width": body.width, "height": body.height, "sampler_name": sampler, "cfg_scale": body.cfg_scale,
        "steps": body.steps, "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": plan.entry.name, "sd_model_hash": plan.entry.short_hash, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": body.seed_resize_from_w,
        "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": body.denoising_strength if plan.mode != "txt2img" else None,
        "extra_generation_params": {"Schedule type": schedule} if schedule else {},
        "index_of_first_image": 0, "infotexts": outcome.infotexts, "styles": body.styles,
        "job_timestamp": job.timestamp, "clip_skip": plan.clip_skip,
        "is_using_inpainting_conditioning": facts.unet_in_channels == 9, "version": version,
    })
