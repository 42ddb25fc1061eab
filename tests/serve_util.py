"""A real `runtime serve` on a loopback port for tests, and a small urllib client that talks to it as clients do."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class Reply:
    """An HTTP response: status, parsed JSON (or None), headers."""
    status: int
    body: object
    headers: dict

    @property
    def text(self) -> str:
        return json.dumps(self.body)


class Served:
    """A server running in a thread of this process (uvicorn on a bound loopback socket)."""

    def __init__(self, settings):
        import uvicorn

        from runtime.serve.server import bind, build

        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.service, self.app = build(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, access_log=False, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the server did not start"
        self.auth = None

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, auth=None,
                headers: dict | None = None, timeout: float = 120) -> Reply:
        """One HTTP request; JSON bodies in and out; auth (user, password) or the server's default."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        auth = auth or self.auth
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Reply(r.status, _json(r.read()), dict(r.headers))
        except urllib.error.HTTPError as e:
            return Reply(e.code, _json(e.read()), dict(e.headers))

    def post(self, path: str, body=None, **kw) -> Reply:
        return self.request("POST", path, body, **kw)

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.service.shutdown(30)


def _json(data: bytes):
    try:
        return json.loads(data) if data else None
    except ValueError:
        return data.decode("utf-8", "replace")


def decode_png(text: str) -> tuple[np.ndarray, str | None]:
    """A base64 PNG -> (pixels (H, W, 3) uint8, its `parameters` text)."""
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")), im.info.get("parameters")


def png_b64(image: Image.Image, data_url: bool = False) -> str:
    """A PIL image as base64 PNG (optionally a data URL, as webuiapi sends)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    text = base64.b64encode(out.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def wait_for(predicate, timeout: float = 30, every: float = 0.02):
    """Poll until predicate() is truthy; return its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")
