"""Mask and image geometry for A1111-style inpainting: binary masks, Gaussian mask blur, crop regions, resize
modes and the masked-area fill (A1111's modules/masking.py and modules/images.py resize_image/flatten)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..images import to_pil

Box = tuple[int, int, int, int]                                   # (x1, y1, x2, y2), x2/y2 exclusive
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))    # masking.fill: (blur radius, composites)
BACKGROUND = "#ffffff"                                            # opts.img2img_background_color


def binary_mask(mask) -> Image.Image:
    """create_binary_mask: a transparent RGBA mask gives its alpha cut at 128; anything else its grayscale."""
    mask = to_pil(mask)
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return mask.convert("L")


def flatten(image) -> Image.Image:
    """images.flatten: transparency composited over the img2img background colour, as RGB."""
    image = to_pil(image)
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, BACKGROUND)
        background.paste(image, mask=image)
        image = background
    return image.convert("RGB")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(2*int(2.5*sigma+0.5)+1, sigma), the 1-D kernel A1111's mask blur uses."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-x * x / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """One separable Gaussian pass with cv2's default border (reflect-101), rounded to whole levels."""
    kernel = gaussian_kernel(sigma)
    radius, n = len(kernel) // 2, a.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(a, pad, mode="reflect") if n > 1 else np.pad(a, pad, mode="edge")
    out = np.zeros(a.shape, dtype=np.float64)
    for i, weight in enumerate(kernel):
        out += weight * np.take(padded, np.arange(i, i + n), axis=axis)
    return np.rint(out)


def blur_mask(mask: Image.Image, sigma_x: float, sigma_y: float) -> Image.Image:
    """A1111's mask blur: a Gaussian along x, then along y (a sigma of 0 skips that pass)."""
    a = np.asarray(mask.convert("L"), dtype=np.float64)
    if sigma_x > 0:
        a = _blur_axis(a, sigma_x, 1)
    if sigma_y > 0:
        a = _blur_axis(a, sigma_y, 0)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def crop_region(mask: Image.Image, pad: int = 0) -> Box | None:
    """masking.get_crop_region_v2: the mask's nonzero bounding box grown by pad, clipped; None when blank."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) by diff split around it, then shift it back inside [0, limit) (one axis of expand_crop_region)."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def expand_crop_region(box: Box, width: int, height: int, image_width: int, image_height: int) -> Box:
    """masking.expand_crop_region: grow the short side of box until it has the width:height ratio."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _stretch_edges(res: Image.Image, resized: Image.Image, width: int, height: int) -> None:
    """resize_image mode 2's fill: stretch the first/last row (or column) of resized into the empty bands."""
    w, h = resized.size
    if h < height and (band := height // 2 - h // 2) > 0:
        res.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        res.paste(resized.resize((width, band), box=(0, h, width, h)), (0, band + h))
    elif w < width and (band := width // 2 - w // 2) > 0:
        res.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        res.paste(resized.resize((band, height), box=(w, 0, w, height)), (band + w, 0))


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """images.resize_image: 0 just resize, 1 crop and resize, 2 resize and fill; Lanczos throughout."""
    if mode == 0:
        return image.resize((width, height), resample=Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    full_width = ratio > src_ratio if mode == 1 else ratio < src_ratio
    src_w = width if full_width else image.width * height // image.height
    src_h = image.height * width // image.width if full_width else height
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    res = Image.new(image.mode, (width, height))
    res.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:
        _stretch_edges(res, resized, width, height)
    return res


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """masking.fill: masked pixels take ever-sharper blurs of the visible ones, composited in turn."""
    visible = Image.new("RGBa", image.size)
    visible.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in FILL_PASSES:
        layer = visible.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")
