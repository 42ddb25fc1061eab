"""Waiting on a service job from a request handler, dropping it when the client goes away while it is queued."""
from __future__ import annotations

import asyncio

POLL_SECONDS = 0.25


class ClientGone(Exception):
    """The client disconnected before its job started; nobody reads the response."""


async def run_job(service, request, work, kind: str, job_count: int = 1):
    """(result, job) of work run on the service; QueueFull / ShuttingDown / the work's errors propagate."""
    job = service.submit(work, kind, job_count)
    waiting = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=POLL_SECONDS)
        if done:
            return waiting.result(), job
        if await request.is_disconnected() and service.cancel(job):
            raise ClientGone()


def note(request, text: str) -> None:
    """What the request log line says about this request (mode, size, steps: never the prompt)."""
    request.state.summary = text
