"""The ASGI app: routes, the web page, error bodies that name the field, auth, body limit, request log.

create_app(service, settings) is the one place an app is built (`runtime serve` runs it under uvicorn; a Ray
Serve deployment can wrap the same app). Errors keep A1111's shape, a JSON object with `detail`, here with the
field it names (`field`) and the error kind (`error`); /v1 routes answer in OpenAI's shape
({"error": {message, type, param, code}}, status 400). Nothing a client sends produces a traceback.
"""
from __future__ import annotations

import logging
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from ..errors import UserError
from .a1111_options import A1111Options
from .errors import QueueFull, ShuttingDown, as_field_error
from .http_jobs import ClientGone
from .middleware import BasicAuth, BodyLimit, RequestLog
from .routes_openai import openai_router
from .routes_sdapi import sdapi_router

log = logging.getLogger("runtime.serve")


def version() -> str:
    """This package's version, as A1111 reports its own in `info`."""
    try:
        return f"sdexport {metadata.version('sdexport')}"
    except metadata.PackageNotFoundError:
        return "sdexport"


def error_response(request: Request, status: int, kind: str, message: str, field: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """A JSON error body in the shape of the API the path belongs to."""
    if request.url.path.startswith("/v1/"):
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                          "param": field, "code": None}}
        return JSONResponse(body, 400 if status == 422 else status, headers)
    return JSONResponse({"error": kind, "detail": message, "field": field}, status, headers)


def _validation_field(loc) -> str:
    """A pydantic error location as a field path: ("body", "init_images", 0) -> init_images[0]."""
    parts = [p for p in loc if p not in ("body", "query")]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to a 4xx/5xx JSON body; bad input never reaches a 500."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            field, message = "body", f"malformed JSON ({first.get('ctx', {}).get('error', 'cannot parse')})"
        else:
            field, message = _validation_field(first.get("loc", ())), first.get("msg", "invalid value")
        response = error_response(request, 422, "ValidationError", f"{field}: {message}", field)
        return response

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        fe = as_field_error(e)
        return error_response(request, fe.status, type(e).__name__, str(fe), fe.field)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return error_response(request, 429, "QueueFull", str(e), None, {"Retry-After": str(e.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, e: ShuttingDown):
        return error_response(request, 503, "ShuttingDown", str(e), None, {"Retry-After": "10"})

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return JSONResponse({"error": "ClientGone", "detail": "the client disconnected"}, 499)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_response(request, e.status_code, "HTTPException", str(e.detail), None, e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("request %s failed", request.scope.get("state", {}).get("request_id"))
        return error_response(request, 500, "InternalError", f"internal error ({type(e).__name__}); see the server log")


def install_page(app: FastAPI, settings) -> None:
    """`/` serves the web page, `/static/` its files (a short 404 while the page is not installed)."""
    index = settings.static_dir / "index.html"

    @app.get("/", include_in_schema=False)
    def page():
        if not index.is_file():
            return JSONResponse({"error": "NotFound", "detail": "the web page is not installed", "field": None}, 404)
        return FileResponse(index)

    app.mount("/static", StaticFiles(directory=settings.static_dir, check_dir=False), name="static")


def create_app(service, settings) -> FastAPI:
    """The server's ASGI app over a GenerationService (its registry holds the models)."""
    app = FastAPI(title="runtime serve", version=version(), docs_url="/docs", redoc_url=None)
    options = A1111Options(service.registry)
    app.include_router(sdapi_router(service, options, settings, version()))
    app.include_router(openai_router(service))
    install_page(app, settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)            # innermost of the three
    if settings.credentials:
        app.add_middleware(BasicAuth, credentials=settings.credentials)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in settings.cors_origins)
    app.add_middleware(RequestLog)                                          # outermost: logs 401s and 413s too
    app.state.service, app.state.options = service, options
    return app
