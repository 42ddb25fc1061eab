"""Dynamic batching: concurrent, compatible requests run as one batched pipeline call, each image as if alone.

Requests share a call when everything a batch shares matches (batch_key): the loaded pipeline, mode and size,
steps, guidance, scheduler and its config, strength, init image and mask (pixel for pixel), A1111 inpaint
options, prompt syntax, CLIP skip, LoRAs (the request's own and its first prompt's tags), output type,
generator kind, and under A1111 syntax the largest chunk count of the prompts and of the negative prompts (A1111
pads a batch to its longest prompt, so a longer neighbour would change an image). Each keeps its own prompts,
negative prompts and seeds: the merged request has one prompt and one seed per image, and runtime.randn's
BatchGenerator gives every image its own noise stream (initial noise, VAE sampling, ancestral steps), which is
exactly what a request with one image or per-image seeds draws alone. A request whose images share one stream
(one seed for several images) runs alone, as do requests with their own latents or ControlNet units.

Two drivers share run_batch: BatchQueue here (threads; `runtime serve --max-batch B --batch-wait-ms T`) and the
Ray Serve deployment's @serve.batch handler (runtime.serve.ray).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from .a1111_run import image_seeds

log = logging.getLogger("runtime.serve")


def _fingerprint(image):
    """A hashable identity of an image's pixels (PIL image or array); None for no image."""
    if image is None:
        return None
    if hasattr(image, "tobytes") and hasattr(image, "mode"):                     # PIL
        return ("pil", image.mode, image.size, hashlib.sha1(image.tobytes()).hexdigest())
    import numpy as np

    a = np.ascontiguousarray(image)
    return ("array", a.dtype.str, a.shape, hashlib.sha1(a.tobytes()).hexdigest())


def _scheduler_key(scheduler):
    """A comparable identity of a request's scheduler: a name, None, or a Scheduler's class, name and config."""
    if scheduler is None or isinstance(scheduler, str):
        return scheduler
    return type(scheduler).__qualname__, getattr(scheduler, "name", ""), repr(getattr(scheduler, "config", None))


def _chunk_counts(pipe, prompts, negatives) -> tuple:
    """(largest chunk count of the prompts, of the negative prompts) under A1111 syntax, first text encoder."""
    from .. import a1111
    from ..layout import TEXT_ENCODERS

    name = next(t for e, t in TEXT_ENCODERS if pipe.model.has(e))
    tok = a1111.clip_chunk_tokenizer(pipe.model.tokenizers[name])
    return tuple(max(len(a1111.tokenize_line(text, tok).chunks) for text in texts) for texts in (prompts, negatives))


def _negatives(request) -> tuple:
    """The request's negative prompt per prompt ("" for none)."""
    negative = request.negative_prompt
    return negative if isinstance(negative, tuple) else (negative or "",) * len(request.prompt)


def batch_key(pipe, request):
    """What must match for two requests to share one pipeline call; None when the request must run alone."""
    r = request
    if r.latents is not None or r.controls or r.guess_mode:
        return None
    if not isinstance(r.seed, tuple) and r.total_images > 1:
        return None                                  # one noise stream for all its images: drawn as one tensor
    from ..a1111.extra_networks import take_lora_tags

    try:
        with warnings.catch_warnings():              # the run itself warns about unsupported tags
            warnings.simplefilter("ignore")
            prompts, tagged = take_lora_tags(r.prompt)
        chunks = _chunk_counts(pipe, prompts, _negatives(r)) if r.prompt_syntax == "a1111" else None
    except Exception:                                # noqa: BLE001 - a request that cannot be keyed runs alone
        return None
    strength = r.effective_strength if r.image is not None else None
    return (pipe, r.mode, r.height, r.width, r.num_inference_steps, float(r.guidance_scale),
            _scheduler_key(r.scheduler), strength, _fingerprint(r.image), _fingerprint(r.mask_image), r.inpaint,
            r.prompt_syntax, r.clip_skip, r.output_type, r.generator_kind, r.negative_prompt is None,
            tuple(r.loras) + tagged, chunks)


@dataclass(eq=False)
class Item:
    """One pipeline run waiting for a batch: what to run, how to report, and where its result goes."""
    pipe: object
    guard: object                                    # the registry's run guard (a lock or a null context)
    request: object                                  # runtime.request.GenerationRequest
    callback: object = None                          # the pipeline's step callback for this request
    key: object = None
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)

    def __post_init__(self):
        self.key = batch_key(self.pipe, self.request)

    @property
    def images(self) -> int:
        """Images this run makes (what a batch's size counts)."""
        return self.request.total_images

    def joins(self, other: "Item") -> bool:
        """Whether this run may share a pipeline call with `other`."""
        return self.key is not None and other.key is not None and self.key == other.key


def merge(requests) -> object:
    """One request with a prompt, negative prompt and seed per image of every request, in order."""
    prompts, negatives, seeds = [], [], []
    for r in requests:
        k = r.num_images_per_prompt
        for prompt, negative in zip(r.prompt, _negatives(r)):
            prompts += [prompt] * k
            negatives += [negative] * k
        seeds += image_seeds(r)
    first = requests[0]
    return replace(first, prompt=tuple(prompts), num_images_per_prompt=1, seed=tuple(seeds),
                   negative_prompt=None if first.negative_prompt is None else tuple(negatives))


def _bounds(items) -> list:
    """(start, stop) of each item's images in the merged batch."""
    out, start = [], 0
    for it in items:
        out.append((start, start + it.images))
        start += it.images
    return out


def _step_callback(items):
    """The merged run's step callback: each item's callback on its slice; stop when every one asks to."""
    bounds = _bounds(items)

    def step(n, total, t, latents):                                   # latents (B, C, h, w), B = all images
        stops = [it.callback(n, total, t, latents[a:b]) if it.callback else False
                 for it, (a, b) in zip(items, bounds)]
        return all(stops)
    return step


def _max_images(pipe) -> int:
    """The largest batch the loaded model was exported for."""
    manifest = getattr(pipe.model, "manifest", None)
    ranges = manifest.shape_ranges if manifest is not None else {}
    return ranges.get("batch", (1, 1, 1 << 30))[2]


def _groups(items) -> list:
    """Items in order, grouped into compatible batches that fit the model's batch range."""
    groups = []
    for it in items:
        home = next((g for g in groups if it.joins(g[0]) and sum(x.images for x in g) + it.images
                     <= _max_images(it.pipe)), None)
        if home is None:
            groups.append([it])
        else:
            home.append(it)
    return groups


def _run_alone(item):
    """One request's own pipeline call: its output, or the exception it raised."""
    try:
        with item.guard:
            return item.pipe.run(item.request, callback=item.callback)
    except Exception as e:                          # noqa: BLE001 - handed back to the request's own caller
        return e


def _run_group(group) -> list:
    """A group's outputs: one merged call sliced per request; each alone when the merged call fails."""
    if len(group) == 1:
        return [_run_alone(group[0])]
    from ..pipeline import PipelineOutput

    first = group[0]
    try:
        with first.guard:
            out = first.pipe.run(merge([it.request for it in group]), callback=_step_callback(group))
    except Exception as e:                          # noqa: BLE001 - find out which request it was
        log.info("batch of %d failed (%s); running its requests one by one", len(group), e)
        return [_run_alone(it) for it in group]
    return [PipelineOutput(out.images[a:b], out.scheduler, out.sampler) for a, b in _bounds(group)]


def run_batch(items) -> list:
    """Each item's PipelineOutput (or the exception its run raised), compatible items run as one call."""
    results = {}
    for group in _groups(items):
        for it, result in zip(group, _run_group(group)):
            results[id(it)] = result
    return [results[id(it)] for it in items]


def unwrap(result):
    """A run_batch result as the pipeline call would give it: the output, or its exception raised."""
    if isinstance(result, BaseException):
        raise result
    return result


class BatchQueue:
    """Pipeline runs from the server's worker threads, merged by `runners` threads into batches of at most
    `max_batch` images; a batch starts when full or `wait_ms` after its oldest run arrived."""

    def __init__(self, max_batch: int, wait_ms: float, runners: int = 1):
        self.max_batch, self.wait = max_batch, wait_ms / 1000.0
        self._pending: list[Item] = []
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{i}", daemon=True) for i in range(runners)]
        for t in self._threads:
            t.start()

    def run(self, pipe, guard, request, callback=None):
        """What pipe.run(request, callback=callback) returns, run inside a batch (called from any thread)."""
        item = Item(pipe, guard, request, callback)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batch queue is closed")
            self._pending.append(item)
            self._cond.notify_all()
        return unwrap(item.future.result())

    def close(self) -> None:
        """Run what is pending, then stop the runner threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _batch_of(self, first: Item) -> list:
        """The oldest pending runs compatible with `first`, up to max_batch images (first always)."""
        batch, images = [first], first.images
        for it in self._pending[1:]:
            if it.joins(first) and images + it.images <= self.max_batch:
                batch.append(it)
                images += it.images
        return batch

    def _take(self) -> list:
        """The next batch to run (blocking); [] once closed and empty."""
        with self._cond:
            while True:
                if not self._pending:
                    if self._closed:
                        return []
                    self._cond.wait()
                    continue
                first = self._pending[0]
                batch = self._batch_of(first)
                left = first.arrived + self.wait - time.monotonic()
                if first.key is None or sum(it.images for it in batch) >= self.max_batch or left <= 0 or self._closed:
                    for it in batch:
                        self._pending.remove(it)
                    self._cond.notify_all()
                    return batch
                self._cond.wait(left)

    def _loop(self) -> None:
        """A runner thread: take batches and hand each run its result."""
        while batch := self._take():
            try:
                results = run_batch(batch)
            except BaseException as e:               # never leave a caller waiting
                results = [e] * len(batch)
            for it, result in zip(batch, results):
                it.future.set_result(result)


def batch_queue(settings) -> BatchQueue | None:
    """The plain server's batcher for its settings (None unless max_batch > 1)."""
    if settings.max_batch <= 1:
        return None
    return BatchQueue(settings.max_batch, settings.batch_wait_ms, runners=settings.workers)
