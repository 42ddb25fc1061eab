"""The generation request: one frozen value that the CLI, the Python API and the HTTP server all build.

Defaults follow diffusers' Stable Diffusion pipelines (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
StableDiffusionInpaintPipeline). Importing this module is cheap (no NumPy): the CLI reads its defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .a1111.inpaint import InpaintOptions

DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 7.5, "num_images_per_prompt": 1, "output_type": "pil",
            "generator_kind": "torch",
            "prompt_syntax": "plain", "clip_skip": 1}
SD3_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 7.0,   # StableDiffusion3Pipeline.__call__'s
                "strength": 0.6}                                     # StableDiffusion3Img2ImgPipeline's
STRENGTH = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0}      # per mode, as each diffusers pipeline's default
OUTPUT_TYPES = ("pil", "np", "latent")
PROMPT_SYNTAXES = ("plain", "a1111")   # literal (diffusers), or AUTOMATIC1111's weights, BREAK and long prompts
MAX_STEPS = 1000


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """What to generate; validated on creation, so every request is valid up to the model's own limits."""
    prompt: tuple                              # one str per prompt (a single str is accepted and wrapped)
    negative_prompt: str | tuple | None = None  # one for every prompt, or one per prompt
    height: int | None = None                  # None: the init image's size, else the model's default
    width: int | None = None
    num_inference_steps: int = DEFAULTS["num_inference_steps"]
    guidance_scale: float = DEFAULTS["guidance_scale"]
    num_images_per_prompt: int = DEFAULTS["num_images_per_prompt"]
    strength: float | None = None              # img2img / inpainting; None: the mode's default (STRENGTH)
    scheduler: object = None                   # registry or diffusers class name, a Scheduler, None: the folder's
    output_type: str = DEFAULTS["output_type"]
    latents: object = None                     # (N, C, H/f, W/f) array of any float dtype, used as float32
    image: object = None                       # PIL image or (H, W, C) array: img2img
    mask_image: object = None                  # with `image`: inpainting, white = repaint
    seed: int | tuple | None = None            # one seed for the batch, or one per image; None: 0
    generator_kind: str = DEFAULTS["generator_kind"]   # "torch" (bit-exact with torch's CPU randn) or "numpy"
    prompt_syntax: str = DEFAULTS["prompt_syntax"]     # one of PROMPT_SYNTAXES
    clip_skip: int = DEFAULTS["clip_skip"]     # A1111 "Clip skip": 1 = last layer, N = N-th from last (diffusers N-1)
    inpaint: InpaintOptions | None = None      # A1111 mask options (runtime.a1111.inpaint); None: as diffusers
    controls: tuple = ()                       # runtime.control.ControlUnit per ControlNet, in order
    guess_mode: bool = False                   # ControlNet on the conditional half only (diffusers' guess_mode)
    loras: tuple = ()                          # ((file path or name in the LoRA folder, weight), ...); weight: a
                                               # number or (text encoder, UNet); a dict {file: weight} is accepted

    @classmethod
    def create(cls, prompt, **options) -> "GenerationRequest":
        """A request from keyword values as the Python API takes them; None stands for the default."""
        return cls(prompt, **{k: v for k, v in options.items() if v is not None})

    def __post_init__(self):
        """Normalise lists to tuples, then refuse bad values with one-line errors."""
        if isinstance(self.prompt, str):
            object.__setattr__(self, "prompt", (self.prompt,))
        for name in ("prompt", "negative_prompt", "seed", "controls"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.loras, (dict, list)):
            object.__setattr__(self, "loras", tuple(self.loras.items() if isinstance(self.loras, dict) else self.loras))
        _validate(self)

    @property
    def mode(self) -> str:
        """txt2img, img2img or inpaint."""
        return "txt2img" if self.image is None else "img2img" if self.mask_image is None else "inpaint"

    @property
    def effective_strength(self) -> float:
        """The strength this request runs with."""
        return STRENGTH[self.mode] if self.strength is None else float(self.strength)

    @property
    def total_images(self) -> int:
        """Images generated: prompts x images per prompt."""
        return len(self.prompt) * self.num_images_per_prompt

    def generator(self):
        """The noise source the seed names: one generator for the batch, or one per image."""
        from .randn import make_generator

        seed = 0 if self.seed is None else self.seed
        batch = self.total_images if isinstance(seed, tuple) else None
        return make_generator(list(seed) if isinstance(seed, tuple) else seed, batch=batch, kind=self.generator_kind)


def _number(value) -> bool:
    """A real int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _texts(value) -> bool:
    """A tuple of strings."""
    return isinstance(value, tuple) and all(isinstance(t, str) for t in value)


def _validate(r: GenerationRequest) -> None:
    """The checks every interface shares, before any model is touched."""
    if not r.prompt:
        raise UserError("no prompt given")
    if not _texts(r.prompt):
        raise UserError("prompt must be a string or a list of strings")
    if r.negative_prompt is not None and not isinstance(r.negative_prompt, str) and not _texts(r.negative_prompt):
        raise UserError("negative_prompt must be a string or a list of strings")
    _check_syntax(r)
    if not isinstance(r.clip_skip, int) or isinstance(r.clip_skip, bool) or r.clip_skip < 1:
        raise UserError(f"clip_skip must be an integer >= 1 (1 = the last layer), got {r.clip_skip!r}")
    if not isinstance(r.num_inference_steps, int) or not 1 <= r.num_inference_steps <= MAX_STEPS:
        raise UserError(f"steps must be an integer in [1, {MAX_STEPS}], got {r.num_inference_steps!r}")
    if not _number(r.guidance_scale) or not math.isfinite(r.guidance_scale) or r.guidance_scale < 0:
        raise UserError(f"guidance must be a finite number >= 0, got {r.guidance_scale!r}")
    if not isinstance(r.num_images_per_prompt, int) or r.num_images_per_prompt < 1:
        raise UserError(f"num_images_per_prompt must be a positive integer, got {r.num_images_per_prompt!r}")
    if r.strength is not None and (not _number(r.strength) or not 0.0 <= r.strength <= 1.0):
        raise UserError(f"strength must be in [0, 1], got {r.strength!r}")
    if r.output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type must be {', '.join(OUTPUT_TYPES[:-1])} or {OUTPUT_TYPES[-1]}, "
                        f"got {r.output_type!r}")
    if r.mask_image is not None and r.image is None:
        raise UserError("a mask needs an init image (--init-image)")
    _check_inpaint(r)
    _check_loras(r)
    if r.controls or r.guess_mode:
        from .control import check_units
        check_units(r.controls, r.guess_mode)
    for name in ("height", "width"):
        value = getattr(r, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    r.generator()                        # seeds and generator kind: SeedError (a UserError) when unusable


def _check_loras(r: GenerationRequest) -> None:
    """Each LoRA entry is (path or name, weight) with a finite weight (or a (text encoder, UNet) pair)."""
    import os

    if not isinstance(r.loras, tuple):
        raise UserError(f"loras must be a dict or a sequence of (file, weight) pairs, got {type(r.loras).__name__}")
    if not r.loras:
        return
    from .lora.library import check_scale

    for item in r.loras:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], (str, os.PathLike)):
            raise UserError(f"loras: each entry must be (file or name, weight), got {item!r}")
        check_scale(item[0], item[1])


def _check_inpaint(r: GenerationRequest) -> None:
    """Inpaint options must be an InpaintOptions and come with a mask."""
    if r.inpaint is None:
        return
    from .a1111.inpaint import InpaintOptions

    if not isinstance(r.inpaint, InpaintOptions):
        raise UserError(f"inpaint must be runtime.a1111.inpaint.InpaintOptions, got {type(r.inpaint).__name__}")
    if r.mask_image is None:
        raise UserError("inpaint options need an init image and a mask (--init-image, --mask)")


def _check_syntax(r: GenerationRequest) -> None:
    """A known prompt syntax; in a1111 mode every prompt must read as written (runtime.a1111.check_prompt)."""
    if r.prompt_syntax not in PROMPT_SYNTAXES:
        raise UserError(f"prompt_syntax must be {' or '.join(PROMPT_SYNTAXES)}, got {r.prompt_syntax!r}")
    if r.prompt_syntax != "a1111":
        return
    from .a1111 import check_prompt

    negatives = (r.negative_prompt,) if isinstance(r.negative_prompt, str) else r.negative_prompt or ()
    for label, texts in (("prompt", r.prompt), ("negative prompt", negatives)):
        for i, text in enumerate(texts):
            check_prompt(text, label if len(texts) == 1 else f"{label} {i}")

