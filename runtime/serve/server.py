"""Running the app under uvicorn: bind, load the first model, serve, and shut down cleanly.

On SIGINT/SIGTERM the service stops taking work at once (waiting requests get 503), the running jobs finish and
their responses go out, then the process exits with status 0; a second Ctrl-C forces the exit (uvicorn's rule).
"""
from __future__ import annotations

import logging
import socket
import threading
import time

from ..errors import UserError

log = logging.getLogger("runtime.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error naming the address."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def build(settings, batcher=None):
    """(service, app) for settings, the first model loaded; `batcher` (runtime.serve.batching) merges runs."""
    from .app import create_app
    from .batching import batch_queue
    from .registry import ModelRegistry
    from .service import GenerationService

    registry = ModelRegistry(settings.model, settings.provider, settings.threads, settings.verify, settings.lora_dir,
                             settings.embeddings_dir)
    start = time.perf_counter()
    registry.pipeline()
    log.info("loaded %s in %.1fs (%d model%s offered)", registry.current.title, time.perf_counter() - start,
             len(registry.entries), "" if len(registry.entries) == 1 else "s")
    registry.batcher = batcher or batch_queue(settings)             # None unless --max-batch > 1
    service = GenerationService(registry, workers=settings.workers * settings.max_batch, queue=settings.queue)
    return service, create_app(service, settings)


def serve(settings, sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or `server.should_exit`), then drain and stop the workers."""
    import uvicorn

    sock = sock or bind(settings.host, settings.port)
    service, app = build(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            threading.Thread(target=service.stop_accepting, name="stop-accepting").start()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()           # exit normally once drained, not by re-raising the signal

    config = uvicorn.Config(app, access_log=False, log_level="info", lifespan="off", timeout_keep_alive=5)
    host, port = sock.getsockname()[:2]
    log.info("serving on http://%s:%d/ (A1111 API at /sdapi/v1, OpenAI images at /v1/images/generations)",
             f"[{host}]" if ":" in host else host, port)
    try:
        Server(config).run(sockets=[sock])
    finally:
        service.shutdown()
        log.info("stopped")
