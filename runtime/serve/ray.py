"""`runtime serve --ray`: the same app (runtime.serve.server.build) as a Ray Serve deployment, on many replicas.

Each replica builds the server's service and app once (the model loaded with `threads` intra-op threads) and Ray's
HTTP proxy routes to the replicas; routes, page, auth and error bodies are the plain server's. With max_batch > 1
a replica's runs are batched by Ray Serve's @serve.batch through runtime.serve.batching.run_batch (the plain
server's BatchQueue uses the same function). State is per replica: /sdapi/v1/progress, interrupt, skip and
POST /options (model switching) reach the one replica Ray routes the call to; a request's own
override_settings.sd_model_checkpoint works on any replica.

For Ray's own tools: `serve run runtime.serve.ray:build_app model=DIR threads=2 replicas=2`, or a config file
whose application has `import_path: runtime.serve.ray:build_app` and `args: {model: DIR, ...}`
(runtime/serve/ray_serve.yaml); its `deployments:` section (name RuntimeServe) overrides replicas and resources.
Reference: Ray Serve docs, "Set up FastAPI and HTTP" (serve.ingress), "Dynamic Request Batching" (serve.batch),
"Serve Config Files" (application builders with args).
"""
from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from ..errors import UserError

try:
    from ray import serve
except ImportError as e:
    raise UserError(f'runtime serve --ray needs the ray extra: pip install "sdexport[ray]" ({e})') from None
from .batching import Item, run_batch, unwrap
from .registry import discover
from .settings import ServeSettings, parse_credentials

APP_NAME = "runtime"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")   # graphs that need a GPU per replica
LIGHT_REQUESTS = 8          # room per replica beyond its generations, so /progress and the page stay answered


class RayBatcher:
    """BatchQueue's `run`, batched by Ray Serve's @serve.batch on the replica's event loop."""

    def __init__(self, loop, max_batch: int, wait_ms: float, runners: int = 1):
        self.loop, self.max_batch = loop, max_batch
        executor = ThreadPoolExecutor(runners, thread_name_prefix="batch")

        def size(items) -> int:                       # images; a request larger than a batch fills one alone
            return sum(min(it.images, max_batch) for it in items)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_ms / 1000.0,
                     max_concurrent_batches=runners, batch_size_fn=size)
        async def handle(items: list) -> list:
            return await asyncio.get_running_loop().run_in_executor(executor, run_batch, items)
        self._handle = handle

    def run(self, pipe, guard, request, callback=None):
        """What pipe.run(request, callback=callback) returns, run inside a batch (from a worker thread)."""
        item = Item(pipe, guard, request, callback)
        return unwrap(asyncio.run_coroutine_threadsafe(self._handle(item), self.loop).result())


@serve.deployment(name="RuntimeServe")
@serve.ingress()
class RuntimeServe:
    """One replica: the plain server's service and ASGI app over one loaded model."""

    def __init__(self, settings: ServeSettings):
        self.settings, self.service = settings, None

    async def __serve_build_asgi_app__(self):
        """Load the model and build the app off the event loop; batch through @serve.batch when asked."""
        from .server import build

        loop, s = asyncio.get_running_loop(), self.settings
        batcher = RayBatcher(loop, s.max_batch, s.batch_wait_ms, s.workers) if s.max_batch > 1 else None
        self.service, app = await loop.run_in_executor(None, build, s, batcher)
        return app

    def describe(self) -> dict:
        """This replica's process, model and threads (for operators and tests, through a deployment handle)."""
        loaded = self.service.registry.loaded()
        return {"pid": os.getpid(), "model": loaded.name if loaded else None, "threads": self.settings.threads,
                "max_batch": self.settings.max_batch, "torch_loaded": "torch" in sys.modules}

    def __del__(self):
        if self.service is not None:                  # drain: running jobs finish, waiting ones get 503
            self.service.shutdown(30)


def replica_options(settings: ServeSettings, replicas: int = 1, autoscale: tuple | None = None) -> dict:
    """Deployment options: replica count or autoscaling, one GPU for GPU folders else `threads` CPUs, and a
    per-replica request limit above what its service admits (its own 429 stays the answer when it is full)."""
    try:
        entries = discover(settings.model)
    except UserError:                                 # a folder only the cluster's nodes have (ray:// clients)
        entries = []
    gpu = settings.provider in ("cuda", "tensorrt") or settings.provider == "auto" and any(
        g.provider in GPU_PROVIDERS for e in entries if e.manifest for g in e.manifest.graphs.values())
    actor = {"num_cpus": 1, "num_gpus": 1} if gpu else {"num_cpus": max(1, settings.threads)}
    slots = settings.workers * settings.max_batch
    options = {"ray_actor_options": actor, "max_ongoing_requests": slots + settings.queue + LIGHT_REQUESTS}
    if autoscale:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max(1, slots)}
    else:
        options["num_replicas"] = replicas
    return options


def with_threads(settings: ServeSettings, replicas: int) -> ServeSettings:
    """threads 0 (the runtime's default) becomes this machine's cores shared by `replicas` replicas."""
    from dataclasses import replace

    if settings.threads:
        return settings
    return replace(settings, threads=max(1, (os.cpu_count() or 1) // max(1, replicas)))


def application(settings: ServeSettings, replicas: int = 1, autoscale: tuple | None = None):
    """The bound Ray Serve application of the deployment."""
    settings = with_threads(settings, autoscale[1] if autoscale else replicas)
    return RuntimeServe.options(**replica_options(settings, replicas, autoscale)).bind(settings)


def parse_autoscale(text: str | None) -> tuple | None:
    """`MIN:MAX` replicas -> (min, max); None stays None."""
    if text is None:
        return None
    low, sep, high = str(text).partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()) or not 0 <= int(low) <= int(high) or not int(high):
        raise UserError(f"--autoscale takes MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return int(low), int(high)


INT_ARGS = ("port", "queue", "workers", "threads", "max_batch", "batch_wait_ms", "max_body_bytes", "replicas")


def _arg(name: str, value):
    """A builder argument (a string from `serve run k=v`, or a YAML value) as the type ServeSettings wants."""
    if name in INT_ARGS:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be an integer, got {value!r}") from None
    if name == "verify" and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"verify must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if name == "cors_origins" and isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value) if name == "cors_origins" else value


def build_app(args: dict):
    """Ray Serve application builder: args are `runtime serve`'s options (model, threads, max_batch, ...,
    api_auth USER:PASS, replicas N or autoscale MIN:MAX)."""
    from pathlib import Path

    known = {"model", "api_auth", "provider", "verify", "cors_origins", "autoscale", *INT_ARGS} - {"port"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UserError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "model" not in args:
        raise UserError("the model argument is missing (model=DIR: an exported folder, or a folder of them)")
    values = {k: _arg(k, v) for k, v in args.items()}
    replicas, autoscale = values.pop("replicas", 1), parse_autoscale(values.pop("autoscale", None))
    credentials = parse_credentials(values.pop("api_auth", None))
    settings = ServeSettings(Path(values.pop("model")), credentials=credentials, **values)
    return application(settings, replicas, autoscale)


def deploy(settings: ServeSettings, replicas: int = 1, autoscale: tuple | None = None):
    """Start Ray's HTTP proxy on settings.host:port and run the application at `/`; its handle."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(application(settings, replicas, autoscale), name=APP_NAME, route_prefix="/")


def stop(own_cluster: bool) -> None:
    """Remove the application: Serve and the cluster with it when we started the cluster, else only our app."""
    import ray

    try:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def check_capacity(settings: ServeSettings, replicas: int, autoscale: tuple | None) -> None:
    """Refuse a replica count this (local) cluster cannot place, instead of waiting for resources forever."""
    import ray

    needed = autoscale[0] if autoscale else replicas
    actor = replica_options(with_threads(settings, autoscale[1] if autoscale else replicas))["ray_actor_options"]
    have = ray.cluster_resources()
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        want = needed * actor.get(key, 0)
        if want > have.get(resource, 0):
            raise UserError(f"{needed} replica(s) need {want:g} {resource}s, this cluster has "
                            f"{have.get(resource, 0):g}: lower --replicas or --threads")


def launch(settings: ServeSettings, replicas: int = 1, autoscale: tuple | None = None,
           address: str | None = None) -> None:
    """`runtime serve --ray`: start a local Ray cluster (or join `address`), deploy, serve until Ctrl-C or
    SIGTERM, then shut down cleanly."""
    import logging
    import signal
    import time

    import ray

    log = logging.getLogger("runtime.serve")
    own = address is None
    if own:
        discover(settings.model)                              # a bad --model fails here, not in every replica
    ray.init(address=address or "local", logging_level=logging.WARNING)

    def terminate(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminate)
    try:
        if own:
            check_capacity(settings, replicas, autoscale)
        deploy(settings, replicas, autoscale)
        count = f"{autoscale[0]}-{autoscale[1]}" if autoscale else str(replicas)
        log.info("serving on http://%s:%d/ with %s Ray Serve replica(s) of %s; Ctrl-C stops", settings.host,
                 settings.port, count, settings.model)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        stop(own)
        log.info("stopped")


def launch_cli(settings: ServeSettings, use_ray: bool, replicas: int, autoscale: str | None,
               address: str | None) -> None:
    """`runtime serve --ray [--replicas N | --autoscale MIN:MAX] [--ray-address A]`: check the options, launch."""
    if not use_ray:
        raise UserError("--replicas, --autoscale and --ray-address need --ray")
    if autoscale and replicas != 1:
        raise UserError("give --replicas N or --autoscale MIN:MAX, not both")
    if replicas < 1:
        raise UserError(f"--replicas must be an integer >= 1, got {replicas}")
    launch(settings, replicas, parse_autoscale(autoscale), address)
