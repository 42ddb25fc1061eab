"""`runtime serve` under bad input, a full queue, disconnects, auth and SIGTERM: 4xx naming the field, never a 500."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from runtime.serve.settings import ServeSettings
from serve_util import Served, png_b64, wait_for

ROOT = Path(__file__).resolve().parent.parent
OK = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
AUTH = ("alice", "s3cret")


@pytest.fixture(scope="module")
def server(tiny_export):
    """One worker, one place in the queue, HTTP Basic auth and a 1 MiB body limit."""
    served = Served(ServeSettings(tiny_export[0], workers=1, queue=1, credentials=(AUTH, ("bob", "pw2")),
                                  max_body_bytes=1 << 20))
    served.auth = AUTH
    yield served
    served.stop()


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A 100-byte PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refused(reply, field: str, status: int = 422) -> None:
    """A JSON error naming the field, with no traceback."""
    assert reply.status == status, (reply.status, reply.body)
    assert isinstance(reply.body, dict) and "Traceback" not in reply.text
    named = reply.body.get("field") if "detail" in reply.body else reply.body["error"]["param"]
    assert named == field, reply.body
    message = reply.body["detail"] if "detail" in reply.body else reply.body["error"]["message"]
    assert field.split("[")[0].split(".")[-1] in message, message


INIT = png_b64(Image.new("RGB", (64, 64), (120, 60, 30)))
TXT2IMG = [
    ({"steps": "many"}, "steps"), ({"steps": 0}, "steps"), ({"steps": 100000}, "steps"),
    ({"cfg_scale": "NaN"}, "cfg_scale"), ({"cfg_scale": float("inf")}, "cfg_scale"), ({"cfg_scale": -1}, "cfg_scale"),
    ({"width": 60}, "width"), ({"height": 4096}, "height"), ({"width": 32}, "width"), ({"width": 64.5}, "width"),
    ({"batch_size": 9}, "batch_size"), ({"batch_size": 0}, "batch_size"), ({"n_iter": 1000}, "n_iter"),
    ({"prompt": 5}, "prompt"), ({"prompt": "(a:b)"}, "prompt"), ({"seed": "x"}, "seed"), ({"seed": 2 ** 70}, "seed"),
    ({"scheduler": "nope"}, "scheduler"), ({"enable_hr": True}, "enable_hr"),
    ({"subseed_strength": 0.5}, "subseed_strength"), ({"restore_faces": True}, "restore_faces"),
    ({"tiling": True}, "tiling"), ({"script_name": "x/y/z plot"}, "script_name"),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
    ({"sampler_name": "DPM++ 2M SDE", "eta": 0.5}, "eta"), ({"override_settings": {"sd_vae": "other.vae"}},
                                                      "override_settings.sd_vae"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": "x"}, "override_settings"),
]


@pytest.mark.parametrize("change,field", TXT2IMG, ids=[f for _, f in TXT2IMG])
def test_bad_txt2img_fields_are_named(server, change, field):
    body = json.dumps(OK | change, allow_nan=True).encode()
    refused(server.post("/sdapi/v1/txt2img", raw=body), field)


def test_unknown_sampler_and_model_are_404_as_a1111(server):
    refused(server.post("/sdapi/v1/txt2img", OK | {"sampler_name": "Euler z"}), "sampler_name", 404)
    refused(server.post("/sdapi/v1/txt2img", OK | {"override_settings": {"sd_model_checkpoint": "sdxl"}}),
            "sd_model_checkpoint", 404)
    refused(server.post("/sdapi/v1/options", {"sd_model_checkpoint": "sdxl"}), "sd_model_checkpoint", 404)


IMG2IMG = [
    ({"init_images": None}, "init_images"), ({"init_images": []}, "init_images"),
    ({"init_images": [INIT, INIT]}, "init_images"), ({"init_images": ["%%%not base64%%%"]}, "init_images[0]"),
    ({"init_images": [base64.b64encode(b"hello, not an image").decode()]}, "init_images[0]"),
    ({"init_images": [base64.b64encode(bomb_png()).decode()]}, "init_images[0]"),
    ({"init_images": ["data:image/png," + INIT]}, "init_images[0]"),
    ({"init_images": ["https://example.com/cat.png"]}, "init_images[0]"),
    ({"init_images": [INIT[: len(INIT) // 2]]}, "init_images[0]"), ({"init_images": [7]}, "init_images[0]"),
    ({"mask": base64.b64encode(bomb_png(5000, 50000)).decode()}, "mask"),
    ({"mask": png_b64(Image.new("L", (32, 32), 255))}, "mask"), ({"denoising_strength": 1.5}, "denoising_strength"),
    ({"mask": png_b64(Image.new("L", (64, 64), 255)), "inpainting_fill": 7}, "inpainting_fill"),
    ({"mask": png_b64(Image.new("L", (64, 64), 255)), "mask_blur": -2}, "mask_blur"),
    ({"resize_mode": 2}, "resize_mode"), ({"initial_noise_multiplier": 0.5}, "initial_noise_multiplier"),
]


@pytest.mark.parametrize("change,field", IMG2IMG, ids=[f"{i}-{f}" for i, (_, f) in enumerate(IMG2IMG)])
def test_bad_img2img_fields_are_named(server, change, field):
    refused(server.post("/sdapi/v1/img2img", OK | {"init_images": [INIT]} | change), field)


def test_malformed_bodies(server):
    refused(server.post("/sdapi/v1/txt2img", raw=b'{"prompt": "a cat", "steps": '), "body")
    refused(server.post("/sdapi/v1/txt2img", raw=b"[1, 2]"), "body")
    refused(server.post("/sdapi/v1/txt2img", raw=b"\xff\xfe not utf-8"), "body")
    refused(server.post("/sdapi/v1/png-info", {"image": base64.b64encode(b"GIF89a nope").decode()}), "image")
    refused(server.post("/sdapi/v1/png-info", {}), "image")


def test_oversized_bodies_get_413(server):
    address = server.server.servers[0].sockets[0].getsockname()[:2]
    token = base64.b64encode(b"alice:s3cret").decode()
    with socket.create_connection(address) as s:      # refused on its Content-Length, before the body is read
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (2 << 20)
                  + b"Content-Type: application/json\r\nAuthorization: Basic " + token.encode() + b"\r\n\r\n{")
        reply = b""
        while b"}" not in reply and (chunk := s.recv(4096)):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 413") and b"body" in reply.split(b"\r\n\r\n", 1)[1]
    with socket.create_connection(address) as s:   # no Content-Length
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/json\r\nAuthorization: Basic " + token.encode() + b"\r\n\r\n")
        piece = b"x" * 65536
        try:
            for _ in range(40):
                s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        except OSError:
            pass
        assert s.recv(200).startswith(b"HTTP/1.1 413")


def test_openai_route_errors_use_openai_shape(server):
    refused(server.post("/v1/images/generations", {"n": 1}), "prompt", 400)
    refused(server.post("/v1/images/generations", {"prompt": "x", "n": 0}), "n", 400)
    refused(server.post("/v1/images/generations", {"prompt": "x", "size": "big"}), "size", 400)
    refused(server.post("/v1/images/generations", {"prompt": "x", "size": "60x64"}), "size", 400)
    refused(server.post("/v1/images/generations", {"prompt": "x", "size": "64x64", "n": 9}), "n", 400)


def test_auth_guards_every_route(server):
    for method, path in (("GET", "/"), ("GET", "/static/api.js"), ("GET", "/sdapi/v1/progress"),
                         ("POST", "/sdapi/v1/txt2img"), ("POST", "/v1/images/generations"), ("GET", "/docs")):
        for auth in (("nobody", "x"), ("alice", "wrong"), ("alice", "s3cret2"), ("", "")):
            reply = server.request(method, path, body=OK if method == "POST" else None, auth=auth)
            assert reply.status == 401 and reply.headers.get("www-authenticate", "").startswith("Basic"), path
        no_header = server.request(method, path, body=OK if method == "POST" else None, auth=("", ""))
        assert no_header.status == 401
    assert server.get("/sdapi/v1/progress", auth=("bob", "pw2")).status == 200


def test_full_queue_gets_429_and_a_gone_client_is_dropped(server):
    long = []
    first = threading.Thread(target=lambda: long.append(server.post("/sdapi/v1/txt2img", OK | {"steps": 1000})))
    first.start()
    wait_for(lambda: server.get("/sdapi/v1/progress").body["state"]["sampling_step"] > 0)
    # a client that queues, then disconnects: its job must leave the queue without running
    s = socket.create_connection(server.server.servers[0].sockets[0].getsockname()[:2])
    body = json.dumps(OK).encode()
    token = base64.b64encode(b"alice:s3cret").decode()
    s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Basic %s\r\nContent-Length: %d\r\n\r\n%s" % (token.encode(), len(body), body))
    wait_for(lambda: server.get("/sdapi/v1/progress").body["state"]["queued"] == 1)
    full = server.post("/sdapi/v1/txt2img", OK)
    assert full.status == 429 and int(full.headers["retry-after"]) >= 1 and "queue" in full.body["detail"]
    s.close()
    wait_for(lambda: server.get("/sdapi/v1/progress").body["state"]["queued"] == 0, timeout=10)
    assert server.service.counts() == (1, 0)
    server.post("/sdapi/v1/interrupt")
    first.join(60)
    assert long[0].status == 200
    assert server.post("/sdapi/v1/txt2img", OK).status == 200          # still serving after all of the above


def test_sigterm_drains_the_running_job_and_exits_cleanly(tiny_export):
    cmd = [sys.executable, "-m", "runtime", "serve", "--model", str(tiny_export[0]), "--port", "0", "--queue", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        port = None
        for line in proc.stderr:
            found = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the server did not start"
        client = Served.__new__(Served)
        client.url, client.auth = f"http://127.0.0.1:{port}", None
        replies = {}
        jobs = [threading.Thread(target=lambda k=k: replies.__setitem__(k, client.post(
            "/sdapi/v1/txt2img", OK | {"steps": 150 if k == "running" else 2}))) for k in ("running", "queued")]
        jobs[0].start()
        wait_for(lambda: client.get("/sdapi/v1/progress").body["state"]["sampling_step"] > 0)
        jobs[1].start()
        wait_for(lambda: client.get("/sdapi/v1/progress").body["state"]["queued"] == 1)
        proc.send_signal(signal.SIGTERM)
        for t in jobs:
            t.join(120)
        assert proc.wait(60) == 0
        assert replies["running"].status == 200 and len(replies["running"].body["images"]) == 1
        assert replies["queued"].status == 503
        log = proc.stderr.read()
        assert "stopped" in log and "Traceback" not in log and "a cat" not in log     # no prompts in the log
    finally:
        if proc.poll() is None:
            proc.kill()
