"""The AUTOMATIC1111-flavoured options of `runtime generate`: --from-png, samplers by A1111 name, inpainting
options and --outpaint, turned into what the request takes."""
from __future__ import annotations

import click

from .errors import UserError

INPAINT_FLAGS = ("mask_blur", "inpaint_full_res", "inpaint_padding", "inpainting_fill", "invert_mask")


def given(ctx, name: str) -> bool:
    """Whether the user passed option `name` (on the command line or through the environment)."""
    return ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                              click.core.ParameterSource.ENVIRONMENT)


def apply_png_parameters(ctx, path: str, values: dict) -> None:
    """Fill the options the user did not pass from an A1111 PNG's `parameters`; warn about fields we ignore."""
    from .a1111.infotext import parameters_from_png

    p = parameters_from_png(path)
    unknown = dict(p.unknown)
    plain = unknown.pop("Prompt syntax", "").strip().lower() == "plain"
    found = {"prompt": p.prompt, "negative_prompt": p.negative_prompt or None, "steps": p.steps,
             "scheduler": (p.sampler, p.schedule_type) if p.sampler else None, "guidance": p.cfg_scale,
             "seed": None if p.seed is None else str(p.seed), "width": p.width, "height": p.height,
             "prompt_syntax": "plain" if plain else "a1111", "clip_skip": p.clip_skip,
             "strength": p.denoising_strength if values["init_image"] else None}
    values.update({k: v for k, v in found.items() if v is not None and not given(ctx, k)})
    if unknown:
        click.echo(f"warning: {path}: ignored A1111 fields: {', '.join(unknown)}", err=True)


def sampler_scheduler(spec, model):
    """A name as the request takes it, or a Scheduler for a PNG's (A1111 sampler, schedule type)."""
    from .schedulers import from_config, resolve_sampler

    if not isinstance(spec, tuple):
        return spec
    try:
        name, overrides = resolve_sampler(*spec)
        return from_config(model.facts.scheduler_config, name, **overrides) if model else None
    except ValueError as e:
        raise UserError(str(e)) from None


def inpaint_options(ctx, values: dict):
    """InpaintOptions when an A1111 mask option or --outpaint is given; None keeps diffusers' inpainting."""
    if values["outpaint"] is None and not any(given(ctx, n) for n in INPAINT_FLAGS):
        return None
    from .a1111.inpaint import InpaintOptions

    return InpaintOptions(mask_blur=values["mask_blur"], inpaint_full_res=values["inpaint_full_res"],
                          inpaint_full_res_padding=values["inpaint_padding"],
                          inpainting_fill=values["inpainting_fill"].replace("-", " "),
                          inpainting_mask_invert=values["invert_mask"])


def outpaint_request(text: str, image, values: dict):
    """--outpaint LEFT,TOP,RIGHT,BOTTOM: the enlarged canvas and its mask (runtime.a1111.inpaint.Outpaint)."""
    from .a1111.inpaint import outpaint_canvas

    if image is None or values["mask"]:
        raise UserError("--outpaint needs --init-image and makes its own mask (leave out --mask)")
    try:
        sides = [int(v) for v in text.split(",")]
    except ValueError:
        sides = []
    if len(sides) != 4:
        raise UserError(f"--outpaint must be LEFT,TOP,RIGHT,BOTTOM in pixels, got {text!r}")
    grown = outpaint_canvas(image, *sides)
    w, h = grown.canvas.size
    if not values["inpaint_full_res"] and ((values["width"] or w, values["height"] or h) != (w, h) or w % 8 or h % 8):
        raise UserError(f"--outpaint paints the {w}x{h} canvas: leave out --width/--height and give an "
                        "--init-image whose sides are multiples of 8, or add --inpaint-full-res")
    return grown


def restore_original(images, grown):
    """The original region of an outpainted canvas put back pixel for pixel: (N, H, W, 3) in [0, 1]."""
    import numpy as np

    x1, y1, x2, y2 = grown.keep
    images = images.copy()
    images[:, y1:y2, x1:x2] = np.asarray(grown.canvas, dtype=np.float32)[y1:y2, x1:x2] / 255.0
    return images
