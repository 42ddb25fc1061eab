"""Image I/O as diffusers' VaeImageProcessor does it, and PNG files with AUTOMATIC1111 parameters."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .atomic import atomic_file
from .errors import UserError


def open_image(path: Path, what: str) -> Image.Image:
    """Read an image file, or fail in one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable image ({type(e).__name__})") from None


def to_pil(image) -> Image.Image:
    """Accept a PIL image or an (H, W, C) / (H, W) array in [0, 1] or uint8."""
    if isinstance(image, Image.Image):
        return image
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(a.squeeze())


def preprocess_image(image, width: int, height: int) -> np.ndarray:
    """RGB, Lanczos-resized to (width, height), scaled to [-1, 1]: (1, 3, H, W) float32."""
    im = to_pil(image).convert("RGB")
    if im.size != (width, height):
        im = im.resize((width, height), resample=Image.LANCZOS)
    a = np.asarray(im).astype(np.float32) / 255.0
    return (2.0 * a - 1.0).transpose(2, 0, 1)[None]


def preprocess_mask(mask, width: int, height: int) -> np.ndarray:
    """Grayscale, Lanczos-resized, binarised at 0.5: (1, 1, H, W) float32, 1 = repaint."""
    im = to_pil(mask).convert("L")
    if im.size != (width, height):
        im = im.resize((width, height), resample=Image.LANCZOS)
    a = np.asarray(im).astype(np.float32) / 255.0
    return (a >= 0.5).astype(np.float32)[None, None]


def postprocess(decoded: np.ndarray) -> np.ndarray:
    """VAE output (N, 3, H, W) in [-1, 1] -> (N, H, W, 3) float32 in [0, 1]."""
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounding as diffusers' numpy_to_pil does."""
    return (images * 255).round().astype(np.uint8)


def a1111_parameters(prompt: str, negative: str, steps: int, sampler: str | tuple, guidance: float, seed,
                     width: int, height: int, model: str, extra: dict | None = None) -> str:
    """The `parameters` text AUTOMATIC1111 writes into its PNGs; sampler: a name or (sampler, schedule type)."""
    from .a1111.infotext import quote

    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    sampler, schedule = sampler if isinstance(sampler, tuple) else (sampler, None)
    fields = {"Steps": steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": guidance, "Seed": seed,
              "Size": f"{width}x{height}", "Model": model} | (extra or {})
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def syntax_fields(texts, syntax: str) -> dict:
    """{"Prompt syntax": "plain"} when A1111 (which always parses its syntax) would read one of these plain-syntax
    prompts differently; nothing otherwise, as A1111 writes nothing for its own syntax."""
    from .a1111 import parse_prompt_attention

    def literal(text: str) -> bool:
        try:
            return parse_prompt_attention(text) == [(text, 1.0)]
        except UserError:
            return False
    return {} if syntax != "plain" or all(literal(t) for t in texts) else {"Prompt syntax": "plain"}


def output_paths(out: Path, count: int) -> list[Path]:
    """`out` itself for one image; `stem-1.ext`, `stem-2.ext`, ... for several."""
    out = Path(out)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(count)]


def save_png(path: Path, image: np.ndarray, parameters: str) -> None:
    """Write one uint8 (H, W, 3) image as PNG with a `parameters` text chunk, atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_file(path) as f:
        Image.fromarray(image).save(f, format="PNG", pnginfo=info)


def save_npy(path: Path, images: np.ndarray) -> None:
    """Write the float images (N, H, W, 3) in [0, 1] as .npy, atomically."""
    with atomic_file(path) as f:
        np.save(f, images)
