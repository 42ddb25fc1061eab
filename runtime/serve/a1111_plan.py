"""An /sdapi/v1 txt2img or img2img body -> a Plan: the GenerationRequest of each batch, seeds, sampler, model.

Reference: A1111 modules/processing.py process_images_inner (seed -1 draws a random seed; batch k of n_iter
holds images k*batch_size ... with seeds seed + index, one noise generator per image), get_fixed_seed,
modules/api/api.py text2imgapi / img2imgapi (sampler_name or sampler_index, apply_infotext: fields the request
sets win over its infotext). A field this runtime does not implement is ignored at its neutral value and refused
with 422 naming it where it would change the image.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UserError
from ..request import GenerationRequest
from .errors import FieldError, as_field_error
from .payload_images import decode_image

NOT_SET = (None, "", "None", "none")
UNSUPPORTED = (      # field, neutral test, what it asks for, the neutral value to send
    ("enable_hr", lambda v: not v, "hires fix", False),
    ("firstphase_width", lambda v: not v, "a first-pass size", 0),
    ("firstphase_height", lambda v: not v, "a first-pass size", 0),
    ("firstpass_image", lambda v: not v, "a first-pass image", None),
    ("subseed_strength", lambda v: not v, "variation seeds", 0),
    ("seed_resize_from_w", lambda v: (v or 0) <= 0, "seed resize", -1),
    ("seed_resize_from_h", lambda v: (v or 0) <= 0, "seed resize", -1),
    ("restore_faces", lambda v: not v, "face restoration", False),
    ("tiling", lambda v: not v, "tiling", False),
    ("script_name", lambda v: v in NOT_SET, "scripts", None),
    ("alwayson_scripts", lambda v: not v, "always-on scripts (extensions)", {}),
    ("s_min_uncond", lambda v: not v, "NGMS (s_min_uncond)", 0),
    ("refiner_checkpoint", lambda v: v in NOT_SET, "a refiner model", None),
    ("initial_noise_multiplier", lambda v: v is None or v == 1, "a noise multiplier", 1),
    ("resize_mode", lambda v: not v, "resize modes other than 0 (just resize)", 0),
    ("latent_mask", lambda v: not v, "a separate latent mask", None),
    ("mask_round", lambda v: v is None or v is True, "an unrounded latent mask", True),
)
CHURN_SAMPLERS = ("Euler", "Heun", "DPM2")       # k-diffusion samplers that take s_churn
INFOTEXT_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps",
                   "sampler": "sampler_name", "schedule_type": "scheduler", "cfg_scale": "cfg_scale", "seed": "seed",
                   "width": "width", "height": "height", "denoising_strength": "denoising_strength"}


@dataclass(frozen=True)
class Plan:
    """What one /sdapi request runs: a GenerationRequest per batch, built before it takes a place in the queue."""
    mode: str                      # txt2img, img2img or inpaint
    entry: object                  # registry.ModelEntry the requests run on
    requests: tuple                # GenerationRequest per batch (n_iter of them), scheduler set at run time
    scheduler: tuple               # (registry name, config overrides) for runtime.schedulers.from_config
    seeds: tuple                   # every image's seed, in order
    subseeds: tuple
    clip_skip: int
    body: object                   # the request body after its infotext was applied, echoed as `parameters`
    keep_model: bool = False       # override_settings_restore_afterwards false: the model stays current

    @property
    def batch_size(self) -> int:
        """Images per batch."""
        return self.requests[0].num_images_per_prompt


def fixed_seed(seed: int) -> int:
    """A1111's get_fixed_seed: -1 draws a random seed in [0, 4294967294)."""
    return random.randrange(4294967294) if seed == -1 else seed


def apply_infotext(body):
    """A1111's apply_infotext: fields of `infotext` fill the ones the request did not set; Clip skip too."""
    if not body.infotext:
        return body
    from ..a1111.infotext import parse_parameters

    try:
        parsed = parse_parameters(body.infotext)
    except UserError as e:
        raise FieldError("infotext", str(e)) from None
    updates = {api: getattr(parsed, ours) for ours, api in INFOTEXT_FIELDS.items()
               if api in type(body).model_fields and api not in body.model_fields_set
               and getattr(parsed, ours) not in (None, "")}
    if parsed.clip_skip != 1 and "CLIP_stop_at_last_layers" not in body.override_settings:
        updates["override_settings"] = body.override_settings | {"CLIP_stop_at_last_layers": parsed.clip_skip}
    return body.model_copy(update=updates)


def check_unsupported(body) -> None:
    """422 naming the first field that asks for something this runtime does not do."""
    for name, neutral, what, value in UNSUPPORTED:
        if name in type(body).model_fields and not neutral(getattr(body, name)):
            raise FieldError(name, f"{what} is not supported by this server; send {value!r} or leave it out")


def sampler_spec(body) -> tuple[str, dict]:
    """(registry name, overrides) of sampler_name (or sampler_index) + scheduler; eta, s_noise, s_churn checked."""
    from ..schedulers import a1111_sampler, from_config, resolve_sampler
    from ..schedulers.a1111 import find_sampler, sampler_labels

    name = body.sampler_name or body.sampler_index
    try:
        ours, overrides = resolve_sampler(name, body.scheduler)
    except ValueError as e:
        if "schedule type" in str(e):
            raise FieldError("scheduler", str(e)) from None
        raise FieldError("sampler_name", f"sampler {name!r} not found; available: {', '.join(sampler_labels())}",
                         status=404) from None
    probe = from_config({}, ours, **overrides)
    label = a1111_sampler(probe)[0]
    found = find_sampler(label)
    ancestral = bool(found and (found[0].options.get("uses_ensd") or found[0].options.get("brownian_noise")))
    if body.eta is not None and "eta" in type(probe).defaults:
        overrides = {**overrides, "eta": float(body.eta)}              # DDIM's eta, as A1111's p.eta
    elif body.eta is not None and ancestral and body.eta != 1:
        raise FieldError("eta", f"{label} runs with eta 1 here; send 1 or leave it out")
    if ancestral and body.s_noise is not None and body.s_noise != 1:
        raise FieldError("s_noise", f"{label} runs with s_noise 1 here; send 1 or leave it out")
    if label in CHURN_SAMPLERS and (body.s_churn or 0) > 0:
        raise FieldError("s_churn", f"{label} with s_churn > 0 is not supported; send 0 or leave it out")
    return ours, overrides


def _check_size(body, entry) -> None:
    """Width and height multiples of the model's VAE factor and inside its exported range; batch size too."""
    f = entry.facts.vae_scale_factor
    for name in ("width", "height"):
        if getattr(body, name) % f:
            raise FieldError(name, f"must be a multiple of {f}, got {getattr(body, name)}")
    try:
        entry.check_shape(body.batch_size, body.height, body.width)
    except UserError as e:
        raise as_field_error(e) from None


def _images(body, max_pixels: int) -> dict:
    """img2img's init image, mask and A1111 mask options as GenerationRequest fields."""
    if not body.init_images:
        raise FieldError("init_images", "img2img needs an init image (a base64 PNG/JPEG or data URL)")
    if len(body.init_images) > 1:
        raise FieldError("init_images", f"{len(body.init_images)} images given; this server takes one per request")
    fields = {"image": decode_image(body.init_images[0], "init_images[0]", max_pixels),
              "strength": body.denoising_strength}
    if body.mask:
        from ..a1111.inpaint import InpaintOptions

        blur = {"mask_blur": body.mask_blur} if body.mask_blur is not None else {
            "mask_blur": body.mask_blur_x, "mask_blur_x": body.mask_blur_x, "mask_blur_y": body.mask_blur_y}
        try:
            fields["inpaint"] = InpaintOptions(
                **blur, inpaint_full_res=body.inpaint_full_res, inpaint_full_res_padding=body.inpaint_full_res_padding,
                inpainting_fill=body.inpainting_fill, inpainting_mask_invert=body.inpainting_mask_invert)
        except UserError as e:
            raise as_field_error(e) from None
        fields["mask_image"] = decode_image(body.mask, "mask", max_pixels)
    return fields


def build_plan(body, registry, options, max_pixels: int) -> Plan:
    """The Plan of a Txt2ImgRequest or Img2ImgRequest; every error is a FieldError naming its field."""
    body = apply_infotext(body)
    check_unsupported(body)
    acting = options.check(body.override_settings, "override_settings")
    entry = acting.get("sd_model_checkpoint", registry.current)
    clip_skip = acting.get("CLIP_stop_at_last_layers", options.clip_skip)
    scheduler = sampler_spec(body)
    _check_size(body, entry)
    images = _images(body, max_pixels) if hasattr(body, "init_images") else {}
    total = body.batch_size * body.n_iter
    seed, subseed = fixed_seed(body.seed), fixed_seed(body.subseed)
    seeds = tuple(seed + k for k in range(total))
    requests = []
    for n in range(body.n_iter):
        batch = seeds[n * body.batch_size:(n + 1) * body.batch_size]
        try:
            requests.append(GenerationRequest.create(
                body.prompt, negative_prompt=body.negative_prompt or None, height=body.height, width=body.width,
                num_inference_steps=body.steps, guidance_scale=body.cfg_scale, num_images_per_prompt=body.batch_size,
                seed=batch[0] if body.batch_size == 1 else batch, output_type="np", prompt_syntax="a1111",
                clip_skip=clip_skip, **images))
        except UserError as e:
            raise as_field_error(e) from None
    mode = "txt2img" if not images else "inpaint" if "mask_image" in images else "img2img"
    return Plan(mode, entry, tuple(requests), scheduler, seeds, tuple(subseed + k for k in range(total)), clip_skip,
                body, keep_model="sd_model_checkpoint" in acting and not body.override_settings_restore_afterwards)
