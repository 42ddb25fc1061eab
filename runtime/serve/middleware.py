"""ASGI middleware of the server: HTTP Basic auth, a request body limit, one log line per request.

Reference: A1111 modules/api/api.py Api.auth (--api-auth USER:PASS[,USER:PASS]: HTTP Basic, 401 with
`WWW-Authenticate: Basic`, secrets.compare_digest). Here auth covers every route, the page and static files
included; credentials are compared in constant time against every configured pair.
"""
from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import time
from secrets import compare_digest

from starlette.exceptions import HTTPException

log = logging.getLogger("runtime.serve")


async def send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    """A complete JSON response from middleware."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _header(scope, name: bytes) -> bytes | None:
    """A request header's raw value."""
    return next((v for k, v in scope.get("headers", ()) if k == name), None)


class BasicAuth:
    """401 unless the request carries one of the configured USER:PASS pairs."""

    def __init__(self, app, credentials: tuple):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]

    def allowed(self, header: bytes | None) -> bool:
        """Whether an Authorization header holds valid credentials (constant time per configured pair)."""
        if not header or not header[:6].lower() == b"basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials:
            ok |= compare_digest(user, u) & compare_digest(password, p) & bool(sep)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed(_header(scope, b"authorization")):
            return await self.app(scope, receive, send)
        await send_json(send, 401, {"error": "Unauthorized", "detail": "Incorrect username or password"},
                        {"WWW-Authenticate": 'Basic realm="runtime serve"'})


class BodyLimit:
    """413 for request bodies over `limit` bytes: by Content-Length before reading, else while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await send_json(send, 413, self._body(int(declared)))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self._body(seen)["detail"])
            return message
        await self.app(scope, counted, send)

    def _body(self, size: int) -> dict:
        return {"error": "PayloadTooLarge", "detail": f"the request body is over {self.limit} bytes ({size} sent)"}


class RequestLog:
    """One INFO line per request: id, method, path, status, seconds, and what a generation route noted (no prompts)."""
    _ids = itertools.count(1)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, start, status = next(self._ids), time.perf_counter(), [500]
        scope.setdefault("state", {})["request_id"] = rid

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", str(rid).encode())]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            noted = scope["state"].get("summary", "")
            log.info("request %d %s %s %d %.2fs%s", rid, scope["method"], scope["path"], status[0],
                     time.perf_counter() - start, f" {noted}" if noted else "")
