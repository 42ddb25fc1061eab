"""The generation service: a bounded queue, worker threads, progress, interrupt and skip; no HTTP in here.

Work is a function of its Job, run on one of `workers` threads; it reports progress through the Job (the
pipeline's step callback) and stops at the next step when interrupted or skipped, as A1111's shared.state does:
interrupt ends the job after the current step, skip ends the current batch and goes on with the next.
/sdapi/v1/progress follows A1111's progressapi for the oldest running job.
"""
from __future__ import annotations

import base64
import datetime
import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from .errors import QueueFull, ShuttingDown


class Job:
    """One request's work and the state /progress reports for it (A1111's shared.state, per job)."""
    _ids = itertools.count(1)

    def __init__(self, work: Callable[["Job"], Any], kind: str, job_count: int = 1):
        self.id, self.work, self.kind, self.future = next(Job._ids), work, kind, Future()
        self.job_count, self.job_no, self.sampling_step, self.sampling_steps = job_count, 0, 0, 0
        self.interrupted = self.skipped = False
        self.started: float | None = None
        self.timestamp = "0"
        self.latents = None                               # (B, C, h, w) after the last step, for previews
        self.preview: Callable | None = None              # latents -> PNG bytes, set by the work

    def next_batch(self, n: int) -> bool:
        """Start batch n (A1111's n_iter loop): False when the job was interrupted."""
        self.job_no, self.sampling_step, self.skipped = n, 0, False
        return not self.interrupted

    def step(self, step: int, total: int, t: float, latents) -> bool:
        """The pipeline's step callback: record progress; True (stop after this step) when interrupted/skipped."""
        self.sampling_step, self.sampling_steps, self.latents = step, total, latents
        return self.interrupted or self.skipped

    def state(self) -> dict:
        """A1111's shared.state.dict() for this job."""
        return {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                "job": self.kind, "job_count": self.job_count, "job_timestamp": self.timestamp,
                "job_no": self.job_no, "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}

    def progress(self) -> tuple[float, float]:
        """(progress in [0, 1], eta_relative in s) as A1111's progressapi computes them."""
        done = 0.01 + self.job_no / self.job_count
        if self.sampling_steps > 0:
            done += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - (self.started or time.time())
        return min(done, 1.0), elapsed / done - elapsed


IDLE_STATE = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}


class GenerationService:
    """Runs jobs on `workers` threads with at most `queue` waiting; owns the model registry the work uses."""

    def __init__(self, registry, workers: int = 1, queue: int = 16):
        self.registry, self.workers, self.queue_size = registry, workers, queue
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._mean_seconds = 10.0                         # running mean job time, for Retry-After
        self._threads = [threading.Thread(target=self._work, name=f"generate-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, work: Callable[[Job], Any], kind: str, job_count: int = 1) -> Job:
        """Queue work; QueueFull when every worker is busy and `queue` jobs already wait."""
        job = Job(work, kind, job_count)
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) + len(self._running) >= self.workers + self.queue_size:
                raise QueueFull(self._retry_after())
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started (its client went away); False once it runs."""
        with self._cond:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
        return job.future.cancel()

    def interrupt(self) -> None:
        """Stop the running jobs at their next step (POST /sdapi/v1/interrupt)."""
        for job in list(self._running):
            job.interrupted = True

    def skip(self) -> None:
        """End the running jobs' current batch at its next step (POST /sdapi/v1/skip)."""
        for job in list(self._running):
            job.skipped = True

    def counts(self) -> tuple[int, int]:
        """(running, waiting) jobs."""
        return len(self._running), len(self._waiting)

    def progress(self, with_image: bool = True) -> dict:
        """A1111's ProgressResponse for the oldest running job; zeros when idle."""
        running, waiting = self.counts()
        job = next(iter(list(self._running)), None)
        extra = {"queued": waiting, "running": running}
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": IDLE_STATE | extra, "current_image": None,
                    "textinfo": None}
        done, eta = job.progress()
        image, latents = None, job.latents
        if with_image and job.preview is not None and latents is not None:
            image = base64.b64encode(job.preview(latents)).decode()
        return {"progress": done, "eta_relative": eta, "state": job.state() | extra, "current_image": image,
                "textinfo": None}

    def stop_accepting(self) -> None:
        """Refuse new work and fail the waiting jobs with ShuttingDown; running ones finish (drain)."""
        with self._cond:
            self._closed = True
            dropped, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for job in dropped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server is shutting down"))

    def shutdown(self, timeout: float | None = None) -> None:
        """stop_accepting, then wait for the running jobs to end."""
        self.stop_accepting()
        for t in self._threads:
            t.join(timeout)

    def _retry_after(self) -> int:
        """Seconds until a place is likely to free up."""
        return max(1, round(self._mean_seconds * (1 + len(self._waiting)) / self.workers))

    def _next(self) -> Job | None:
        """The next job to run (blocking), or None once closed and empty."""
        with self._cond:
            while True:
                while self._waiting:
                    job = self._waiting.popleft()
                    if job.future.set_running_or_notify_cancel():
                        job.started = time.time()
                        job.timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
                        self._running.append(job)
                        return job
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self) -> None:
        """A worker thread: run jobs until the service closes."""
        while (job := self._next()) is not None:
            try:
                job.future.set_result(job.work(job))
            except BaseException as e:                     # the HTTP layer decides what the client sees
                job.future.set_exception(e)
            finally:
                with self._cond:
                    self._running.remove(job)
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.time() - job.started)
