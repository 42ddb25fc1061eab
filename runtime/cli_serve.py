"""`runtime serve`: parse the options, build ServeSettings, run the server (runtime.serve.server)."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from .cliutil import debug_option
from .errors import UserError

INSTALL = 'runtime serve needs the serve extra: pip install "sdexport[serve]" (FastAPI and uvicorn)'


@click.command()
@click.option("--model", required=True, type=click.Path(), help="An exported folder, or a folder of them (each a model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 serves the network).")
@click.option("--port", default=7860, show_default=True, type=int, help="TCP port (A1111's default).")
@click.option("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
              help="HTTP Basic credentials for every route, as A1111's --api-auth.")
@click.option("--queue", default=16, show_default=True, type=int,
              help="Requests that may wait while the workers are busy; more get 429.")
@click.option("--workers", default=1, show_default=True, type=int, help="Generations run at the same time.")
@click.option("--threads", default=0, type=int, help="Intra-op threads per session (0 = the runtime's default).")
@click.option("--provider", default="auto", show_default=True, help="auto, cpu, cuda, tensorrt or directml.")
@click.option("--cors-origin", multiple=True, metavar="ORIGIN",
              help="Allow browser pages from ORIGIN (repeatable; * for any).")
@click.option("--no-verify", is_flag=True, help="Skip the SHA-256 check of the graph files when a model loads.")
@click.option("--max-batch", default=1, show_default=True, type=int,
              help="Run up to B images of concurrent compatible requests as one batched pipeline call.")
@click.option("--batch-wait-ms", default=10, show_default=True, type=int,
              help="How long a run waits for compatible requests to join its batch.")
@click.option("--ray", "use_ray", is_flag=True, help='Serve as a Ray Serve deployment (pip install "sdexport[ray]").')
@click.option("--replicas", default=1, show_default=True, type=int, help="With --ray: replicas, each with the model.")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="With --ray: autoscale between MIN and MAX replicas.")
@click.option("--ray-address", default=None, metavar="auto|ray://HOST:PORT",
              help="With --ray: join this Ray cluster instead of starting one on this machine.")
@click.option("--lora-dir", default=None, type=click.Path(), metavar="DIR",
              help="LoRA files that prompts name with A1111's <lora:name:weight> tags; listed at /sdapi/v1/loras.")
@click.option("--embeddings-dir", default=None, type=click.Path(), metavar="DIR",
              help="Textual-inversion embeddings prompts name by file stem; listed at /sdapi/v1/embeddings.")
@debug_option
def serve(model, host, port, api_auth, queue, workers, threads, provider, cors_origin, no_verify, max_batch,
          batch_wait_ms, use_ray, replicas, autoscale, ray_address, lora_dir, embeddings_dir):
    """Serve a model over HTTP: AUTOMATIC1111's /sdapi/v1 API, OpenAI's images route and a web page at /."""
    try:
        from .serve.server import serve as run_server
    except ImportError as e:
        raise UserError(f"{INSTALL} ({e})") from None
    from .serve.settings import ServeSettings, parse_credentials

    settings = ServeSettings(Path(model), host=host, port=port, credentials=parse_credentials(api_auth),
                             queue=queue, workers=workers, threads=threads, provider=provider,
                             verify=not no_verify, cors_origins=tuple(cors_origin), max_batch=max_batch,
                             batch_wait_ms=batch_wait_ms, lora_dir=Path(lora_dir) if lora_dir else None,
                             embeddings_dir=Path(embeddings_dir) if embeddings_dir else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not settings.loopback and not settings.credentials:
        click.echo(f"warning: serving on {host} without --api-auth: anyone who can reach this port can use it",
                   err=True)
    if use_ray or replicas != 1 or autoscale or ray_address:
        from .serve.ray import launch_cli
        return launch_cli(settings, use_ray, replicas, autoscale, ray_address)
    run_server(settings)
