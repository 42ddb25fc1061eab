"""Errors the HTTP layer turns into 4xx JSON bodies that name the offending field."""
from __future__ import annotations

import re

from ..errors import UserError

# Phrases of runtime.request / runtime.a1111 / runtime.manifest messages -> the A1111 field they are about.
_FIELD_OF = (
    (r"^(no prompt|prompt\b)", "prompt"), (r"^negative[ _]prompt", "negative_prompt"),
    (r"^steps\b", "steps"), (r"^guidance\b", "cfg_scale"), (r"^strength\b", "denoising_strength"),
    (r"^(num_images_per_prompt|batch\b)", "batch_size"), (r"^height\b", "height"), (r"^width\b", "width"),
    (r"^width and height", "width"), (r"^(seed|the seed|got \d+ seeds)", "seed"), (r"^clip_skip", "clip_skip"),
    (r"^mask blur", "mask_blur"), (r"^inpaint full res padding", "inpaint_full_res_padding"),
    (r"^inpainting fill", "inpainting_fill"), (r"^mask is \d+x\d+", "mask"),
    (r"^unknown (or unsupported )?(scheduler|schedule type)|does not support schedule type", "sampler_name"),
)


class FieldError(UserError):
    """A bad value of one request field: `status` 422 (A1111's validation status) unless said otherwise."""

    def __init__(self, field: str | None, message: str, status: int = 422):
        named = not field or message.startswith(field)
        super().__init__(message if named else f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


class QueueFull(Exception):
    """The bounded queue has no free place (HTTP 429 with Retry-After)."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server stopped taking work (HTTP 503)."""


def field_of(message: str) -> str | None:
    """The A1111 field a runtime UserError message is about, when its wording says so."""
    text = message.strip()
    for pattern, name in _FIELD_OF:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return name
    return None


def as_field_error(error: UserError, field: str | None = None) -> FieldError:
    """A UserError from the runtime as a FieldError naming its field (given, or read from the message)."""
    if isinstance(error, FieldError):
        return error
    message = str(error)
    return FieldError(field or field_of(message), message)
