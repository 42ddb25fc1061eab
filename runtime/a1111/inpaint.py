"""AUTOMATIC1111's inpainting and outpainting options as pre/post-processing around one generation call.

References (AUTOMATIC1111/stable-diffusion-webui):
- modules/processing.py, StableDiffusionProcessingImg2Img.init: create_binary_mask (a transparent RGBA mask
  uses its alpha, cut at 128), invert, cv2.GaussianBlur along x then along y with sigma mask_blur_x / mask_blur_y
  and kernel 2*int(2.5*sigma+0.5)+1 (mask_blur sets both). "Only masked" (inpaint_full_res): overlay mask = the
  blurred mask, crop = get_crop_region_v2(mask, padding) grown by expand_crop_region to width:height, image and
  mask crops resized with resize_image mode 2, paste_to = (x1, y1, w, h); a blank mask falls back to the whole
  picture. "Whole picture": image and mask resized to (width, height), overlay mask = clip(2 * mask). The overlay
  is the image pasted on a transparent RGBa canvas through the inverted overlay mask. inpainting_fill != 1
  runs masking.fill under the processed mask; the latent mask is that mask resized to latent size (Pillow's
  default filter) and rounded; fill 2: init * (1 - m) + noise(seed) * m, fill 3: init * (1 - m); after sampling
  samples * m + init * (1 - m).
- modules/processing.py apply_overlay: the result is resized with resize_image mode 1 to (w, h), pasted at (x, y)
  on a transparent canvas of the overlay's size, and the overlay is alpha-composited over it.
- modules/masking.py: get_crop_region_v2, expand_crop_region, fill (visible pixels blurred with radii
  256, 64, 16, 4, 2, 0, composited over each other).
- modules/images.py resize_image (0 just resize, 1 crop and resize, 2 resize and fill; Lanczos) and flatten
  (transparency over img2img_background_color, "#ffffff").
- StableDiffusionProcessingImg2Img / the /sdapi img2img defaults: mask_blur 4, inpainting_fill 0,
  inpaint_full_res True, inpaint_full_res_padding 0 (the UI's slider starts at 32), inpainting_mask_invert 0.
- scripts/poor_mans_outpainting.py: outpainting is inpainting on an enlarged canvas whose new area is masked white.
  We fill the new area with edge-extended pixels (the seam continues the border) and keep the original region
  pixel for pixel, so the mask blur softens only the new side of the seam.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError
from ..images import to_pil
from .masking import Box, binary_mask, blur_mask, crop_region, expand_crop_region, fill_masked, flatten, resize_image

FILL_MODES = ("fill", "original", "latent noise", "latent nothing")   # A1111's inpainting_fill 0..3


def fill_index(value) -> int:
    """A1111's inpainting_fill as its integer: 0..3, or a name from FILL_MODES."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(FILL_MODES):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in FILL_MODES:
        return FILL_MODES.index(value.strip().lower())
    raise UserError(f"inpainting fill {value!r} is not 0-3 or one of: {', '.join(FILL_MODES)}")


@dataclass(frozen=True)
class InpaintOptions:
    """A1111's img2img mask options; defaults are its API's (the UI starts with padding 32, fill "original")."""
    mask_blur: float = 4
    mask_blur_x: float | None = None       # None: mask_blur
    mask_blur_y: float | None = None
    inpaint_full_res: bool = True          # "Only masked"
    inpaint_full_res_padding: int = 0
    inpainting_fill: int | str = 0         # stored as 0..3
    inpainting_mask_invert: bool = False   # the API sends 0 / 1

    def __post_init__(self):
        object.__setattr__(self, "inpainting_fill", fill_index(self.inpainting_fill))
        object.__setattr__(self, "inpainting_mask_invert", bool(self.inpainting_mask_invert))
        for name in ("mask_blur", "mask_blur_x", "mask_blur_y", "inpaint_full_res_padding"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise UserError(f"{name.replace('_', ' ')} must be a number >= 0, got {value!r}")
        if self.inpaint_full_res_padding != int(self.inpaint_full_res_padding):
            raise UserError(f"inpaint full res padding must be whole pixels, got {self.inpaint_full_res_padding!r}")

    @property
    def blur_xy(self) -> tuple[float, float]:
        """Gaussian sigmas along x and y."""
        x, y = self.mask_blur_x, self.mask_blur_y
        return (self.mask_blur if x is None else x), (self.mask_blur if y is None else y)


@dataclass(frozen=True)
class Prepared:
    """The pipeline's inputs at (width, height) and what paste_back needs to restore the unmasked pixels."""
    image: Image.Image          # RGB (width, height): init image, masked area pre-filled unless fill is "original"
    mask: Image.Image           # L (width, height): processed (blurred) mask, 255 = repaint
    overlay: Image.Image        # RGBA: original pixels, alpha = 255 - overlay mask; full size when paste_to is set
    paste_to: tuple[int, int, int, int] | None   # (x, y, w, h) of the crop in the full image ("only masked")
    fill: int

    def latent_mask(self, latent_height: int, latent_width: int) -> np.ndarray:
        """The mask at latent size as A1111 makes it (Pillow's default resize, rounded): (1, 1, h, w), 1 = repaint."""
        small = self.mask.convert("RGB").resize((latent_width, latent_height))
        return np.around(np.asarray(small, dtype=np.float32)[..., 0] / 255.0)[None, None]


@dataclass(frozen=True)
class Outpaint:
    """An enlarged canvas, its mask (white = new area) and the original region; unpacks as (canvas, mask)."""
    canvas: Image.Image
    mask: Image.Image
    keep: Box

    def __iter__(self):
        return iter((self.canvas, self.mask))


def _overlay(image: Image.Image, overlay_mask: Image.Image, keep: Box | None) -> Image.Image:
    """The original pixels on a transparent canvas, opaque where overlay_mask is 0 and inside keep."""
    alpha = ImageOps.invert(overlay_mask)
    if keep is not None:
        alpha.paste(255, keep)
    overlay = Image.new("RGBa", image.size)
    overlay.paste(image.convert("RGBA").convert("RGBa"), mask=alpha)
    return overlay.convert("RGBA")


def _scaled(box: Box | None, size: tuple[int, int], width: int, height: int) -> Box | None:
    """A box in an image of `size` mapped inward onto (width, height)."""
    if box is None or size == (width, height):
        return box
    sx, sy = width / size[0], height / size[1]
    x1, y1, x2, y2 = box
    return int(np.ceil(x1 * sx)), int(np.ceil(y1 * sy)), int(x2 * sx), int(y2 * sy)


def _check(image: Image.Image, mask: Image.Image, width: int, height: int) -> None:
    """One-line errors for a mask of the wrong size or a target size the latents cannot have."""
    if mask.size != image.size:
        raise UserError(f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                        "they must be the same size")
    if not all(isinstance(v, int) and v > 0 and v % 8 == 0 for v in (width, height)):
        raise UserError(f"width and height must be positive multiples of 8, got {width}x{height}")


def prepare(image, mask, width: int, height: int, opts: InpaintOptions = InpaintOptions(),
            keep: Box | None = None) -> Prepared:
    """StableDiffusionProcessingImg2Img.init's mask handling; keep: a box that paste_back must restore exactly."""
    image, mask = flatten(image), binary_mask(mask)
    _check(image, mask, width, height)
    if opts.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, *opts.blur_xy)
    box = crop_region(mask, int(opts.inpaint_full_res_padding)) if opts.inpaint_full_res else None
    if box is None:                                   # whole picture (or a blank mask)
        keep = _scaled(keep, image.size, width, height)
        image, mask = resize_image(0, image, width, height), resize_image(0, mask, width, height)
        overlay_mask, paste_to = mask.point(lambda v: min(2 * v, 255)), None
    else:                                             # only masked: work on the crop at (width, height)
        box = expand_crop_region(box, width, height, *mask.size)
        overlay_mask, paste_to = mask, (box[0], box[1], box[2] - box[0], box[3] - box[1])
    overlay = _overlay(image, overlay_mask, keep)
    if box is not None:
        image = resize_image(2, image.crop(box), width, height)
        mask = resize_image(2, mask.crop(box), width, height)
    if opts.inpainting_fill != 1:
        image = fill_masked(image, mask)
    return Prepared(image, mask, overlay, paste_to, opts.inpainting_fill)


def paste_back(generated, prepared: Prepared) -> Image.Image:
    """processing.apply_overlay: the generated crop back in place, then the original pixels composited over it."""
    result = to_pil(generated).convert("RGB")
    if result.size != prepared.image.size:
        raise UserError(f"generated image is {result.width}x{result.height}, expected "
                        f"{prepared.image.width}x{prepared.image.height}")
    if prepared.paste_to is not None:
        x, y, w, h = prepared.paste_to
        canvas = Image.new("RGBA", prepared.overlay.size)
        canvas.paste(resize_image(1, result, w, h), (x, y))
        result = canvas
    result = result.convert("RGBA")
    result.alpha_composite(prepared.overlay)
    return result.convert("RGB")


def initial_latents(init_latents: np.ndarray, latent_mask: np.ndarray, fill, randn: np.ndarray | None = None):
    """A1111's latent fills: "latent noise" puts randn where latent_mask is 1, "latent nothing" zeros; else as is."""
    fill = fill_index(fill)
    if fill == 2:
        if randn is None or np.shape(randn) != np.shape(init_latents):
            raise ValueError("latent noise needs randn shaped like init_latents")
        return init_latents * (1.0 - latent_mask) + randn * latent_mask     # (B, 4, H/8, W/8)
    if fill == 3:
        return init_latents * (1.0 - latent_mask)
    return init_latents


def blend_latents(samples: np.ndarray, init_latents: np.ndarray, latent_mask: np.ndarray) -> np.ndarray:
    """A1111's end of sampling (and CFGDenoiser's per-step blend): sampled inside the mask, init outside."""
    return samples * latent_mask + init_latents * (1.0 - latent_mask)


def outpaint_canvas(image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0) -> Outpaint:
    """Enlarge the canvas by whole latent cells, fill the new area with edge pixels and mask it white."""
    sides = {"left": left, "top": top, "right": right, "bottom": bottom}
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 8:
            raise UserError(f"outpaint {name} must be a multiple of 8 pixels >= 0, got {value!r}")
    if not any(sides.values()):
        raise UserError("outpaint needs at least one side to extend")
    pixels = np.asarray(flatten(image))                                    # (H, W, 3)
    h, w = pixels.shape[:2]
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top:top + h, left:left + w] = 0
    return Outpaint(Image.fromarray(canvas), Image.fromarray(mask, "L"), (left, top, left + w, top + h))
