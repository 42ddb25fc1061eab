"""/sdapi/v1 routes: thin adapters from A1111's API to the plan builder, the service and the registry.

Reference: A1111 modules/api/api.py (routes, methods, response shapes). Lists of things this runtime does not
have (VAEs, upscalers, styles, scripts) are answered empty, as A1111 answers with none installed.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..schedulers import a1111_samplers, a1111_schedulers
from .a1111_fields import Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from .a1111_plan import build_plan
from .a1111_run import echoed_parameters, info_json, run_plan
from .http_jobs import note, run_job
from .payload_images import b64, decode_image
from .registry import available_embeddings, available_loras

EMPTY_LISTS = ("sd-vae", "upscalers", "latent-upscale-modes", "prompt-styles", "hypernetworks", "face-restorers",
               "realesrgan-models", "extensions", "script-info")


def sdapi_router(service, options, settings, version: str) -> APIRouter:
    """The /sdapi/v1 routes over one service."""
    router, registry = APIRouter(prefix="/sdapi/v1"), service.registry

    async def generate(body, request: Request) -> dict:
        plan = await run_in_threadpool(build_plan, body, registry, options, settings.max_image_pixels)
        outcome, job = await run_job(service, request, lambda job: run_plan(plan, registry, job), plan.mode,
                                     len(plan.requests))
        note(request, f"{plan.mode} {body.width}x{body.height} steps={body.steps} images={len(outcome.images)} "
                      f"model={plan.entry.name}")
        return {"images": [b64(png) for png in outcome.images] if body.send_images else [],
                "parameters": echoed_parameters(plan.body), "info": info_json(plan, outcome, job, version)}

    @router.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await generate(body, request)

    @router.post("/img2img")
    async def img2img(body: Img2ImgRequest, request: Request):
        return await generate(body, request)

    @router.get("/progress")
    def progress(skip_current_image: bool = False):
        return service.progress(with_image=not skip_current_image)

    @router.post("/interrupt")
    def interrupt():
        service.interrupt()
        return {}

    @router.post("/skip")
    def skip():
        service.skip()

    @router.get("/options")
    def get_options():
        return options.values()

    @router.post("/options")
    async def set_options(body: dict, request: Request):
        await run_in_threadpool(options.apply, body)
        note(request, f"options model={registry.current.name}")

    @router.get("/sd-models")
    def sd_models():
        return [e.item() for e in registry.entries]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints():
        return None

    @router.get("/samplers")
    def samplers():
        return a1111_samplers()

    @router.get("/schedulers")
    def schedulers():
        return a1111_schedulers()

    @router.get("/loras")
    def loras():
        return available_loras(settings.lora_dir)

    @router.get("/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @router.get("/embeddings")
    def embeddings():
        return available_embeddings(registry)

    for name in EMPTY_LISTS:
        router.add_api_route(f"/{name}", lambda: [], methods=["GET"], name=name)

    @router.post("/png-info")
    def png_info(body: PngInfoRequest):
        return png_info_of(decode_image(body.image, "image", settings.max_image_pixels))

    return router


def png_info_of(image) -> dict:
    """A1111's PNGInfoResponse: the infotext, the other text items, the infotext's fields (A1111's key names)."""
    from ..a1111.infotext import RE_SIZE, parameter_pairs, split_infotext

    text = image.info.get("parameters")
    text = text if isinstance(text, str) else ""
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    prompt, negative, last = split_infotext(text)
    fields = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in parameter_pairs(last).items():
        size = RE_SIZE.match(value)
        fields |= {f"{key}-1": size.group(1), f"{key}-2": size.group(2)} if size else {key: value}
    return {"info": text, "items": items, "parameters": {"Clip skip": "1", "Schedule type": "Automatic"} | fields}
