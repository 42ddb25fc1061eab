"""POST /v1/images/generations: OpenAI's images API, for clients that speak it.

Reference: OpenAI API reference, "Create image" (prompt, n, size "WIDTHxHEIGHT", response_format url | b64_json;
response {created, data: [{b64_json}]}; errors {error: {message, type, param, code}} with status 400). Prompts
are literal and the other settings are the diffusers defaults of runtime.request (steps, guidance, the folder's
scheduler), as for the Python API. Images come back as base64 PNGs (with their parameters text): this server keeps
no files to link to, so response_format "url" is refused naming the field. `model` selects one of the server's
models when it names one; other names (dall-e-3, ...) use the current model.
"""
from __future__ import annotations

import random
import re
import time

from fastapi import APIRouter, Request

from ..errors import UserError
from ..request import GenerationRequest
from .a1111_fields import OpenAIImageRequest
from .a1111_run import run_requests
from .errors import FieldError, as_field_error
from .http_jobs import note, run_job
from .payload_images import b64

SIZE = re.compile(r"^(\d+)x(\d+)$")


def _entry(registry, model: str | None):
    """The model `model` names, else the current one."""
    try:
        return registry.find(model) if model else registry.current
    except FieldError:
        return registry.current


def _size(text: str | None, entry) -> tuple[int, int]:
    """(width, height) of `size`, the model's default size when absent."""
    if text is None or text == "auto":
        d = entry.facts.default_size
        return d, d
    found = SIZE.match(text.strip())
    if not found:
        raise FieldError("size", f"must be WIDTHxHEIGHT in pixels, e.g. 512x512, got {text!r}", status=400)
    width, height = int(found.group(1)), int(found.group(2))
    f = entry.facts.vae_scale_factor
    try:
        if width % f or height % f:
            raise UserError(f"width and height must be multiples of {f}, got {text}")
        entry.check_shape(1, height, width)
    except UserError as e:
        raise FieldError("size", str(e), status=400) from None
    return width, height


def build_request(body: OpenAIImageRequest, registry) -> tuple:
    """(entry, GenerationRequest) of an OpenAI body; n images with seeds seed, seed+1, ... (seed random)."""
    if body.response_format not in (None, "b64_json"):
        raise FieldError("response_format", f"{body.response_format!r} is not supported; this server returns "
                                            "b64_json (base64 PNG) only", status=400)
    entry = _entry(registry, body.model)
    width, height = _size(body.size, entry)
    try:
        entry.check_shape(body.n, height, width)
    except UserError as e:
        raise FieldError("n", str(e), status=400) from None
    seed = random.randrange(4294967294)
    seeds = tuple(seed + k for k in range(body.n))
    try:
        request = GenerationRequest.create(body.prompt, width=width, height=height, num_images_per_prompt=body.n,
                                           seed=seeds[0] if body.n == 1 else seeds, output_type="np")
    except UserError as e:
        raise as_field_error(e) from None
    return entry, request


def openai_router(service) -> APIRouter:
    """The OpenAI-style images route over one service."""
    router, registry = APIRouter(), service.registry

    @router.post("/v1/images/generations")
    async def generations(body: OpenAIImageRequest, request: Request):
        entry, req = build_request(body, registry)
        outcome, _ = await run_job(service, request, lambda job: run_requests([req], None, entry, registry, job),
                                   "openai")
        note(request, f"openai {req.width}x{req.height} steps={req.num_inference_steps} images={len(outcome.images)} "
                      f"model={entry.name}")
        return {"created": int(time.time()), "data": [{"b64_json": b64(png)} for png in outcome.images]}

    return router
