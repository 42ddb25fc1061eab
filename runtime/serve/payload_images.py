"""Images inside JSON bodies: base64 / data-URL decoding with size limits checked before decoding, and PNGs out.

Reference: A1111 modules/api/api.py decode_base64_to_image (a `data:image/...;base64,` prefix is dropped;
http(s) URLs are fetched only with --api-enable-requests: never here) and encode_pil_to_base64 (PNG with its
text chunks). A picture's size is read from its header, so a small file that claims 60000x60000 pixels is
refused before a byte of it is decompressed.
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import FieldError


def _b64_bytes(text: str, field: str) -> bytes:
    """The bytes of a base64 string or data URL, or a FieldError naming the field."""
    text = text.strip()
    if text.startswith(("http://", "https://")):
        raise FieldError(field, "image URLs are not fetched; send the image as base64 or a data URL")
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise FieldError(field, "a data URL must be base64-encoded (data:image/png;base64,...)")
    data = "".join(text.split())
    if not data:
        raise FieldError(field, "the image is empty")
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64") from None


def decode_image(text, field: str, max_pixels: int) -> Image.Image:
    """A fully decoded PIL image from a base64 string or data URL; refused when its header claims > max_pixels."""
    if not isinstance(text, str):
        raise FieldError(field, f"an image must be a base64 string, got {type(text).__name__}")
    raw = _b64_bytes(text, field)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise FieldError(field, f"the image is {w}x{h} pixels; this server takes at most {max_pixels}")
            im.load()
            return im.copy()
    except Image.DecompressionBombError:
        raise FieldError(field, f"the image claims more than {max_pixels} pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise FieldError(field, f"not a readable image ({type(e).__name__})") from None


def png_bytes(pixels: np.ndarray, parameters: str | None = None) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes, with A1111's `parameters` text chunk when given."""
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def b64(data: bytes) -> str:
    """Bytes as a base64 string (A1111 and OpenAI send images this way)."""
    return base64.b64encode(data).decode("ascii")
