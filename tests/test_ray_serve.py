"""Dynamic batching (runtime.serve.batching) and the Ray Serve deployment (runtime.serve.ray).

Batching: concurrent compatible requests run as one pipeline call and each image equals the one made alone (same
seed, prompt, negative prompt; ancestral samplers too); requests that would change each other are not merged.
Ray (marker `ray`): a local cluster, 2 replicas of the tiny model behind Ray's proxy, 8 concurrent A1111
requests equal to `runtime generate`, 2 running replicas in serve.status(), no Ray process left after shutdown.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from runtime.request import GenerationRequest

SIZE, STEPS = 64, 4


class Counting:
    """A pipeline that records the image count of every call it runs."""

    def __init__(self, pipe, fail_batches: bool = False):
        self.pipe, self.model, self.calls, self.fail_batches = pipe, pipe.model, [], fail_batches

    def run(self, request, callback=None):
        self.calls.append(request.total_images)
        if self.fail_batches and request.total_images > 1:
            raise RuntimeError("batched call refused")
        return self.pipe.run(request, callback=callback)


@pytest.fixture(scope="module")
def pipe(tiny_export):
    from runtime.pipeline import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu", threads=1)


def req(prompt, seed, **kw):
    options = dict(width=SIZE, height=SIZE, num_inference_steps=STEPS, output_type="np", negative_prompt="",
                   scheduler="euler-a", prompt_syntax="a1111") | kw
    return GenerationRequest.create(prompt, seed=seed, **options)


def items(pipe, requests, callbacks=None):
    from runtime.serve.batching import Item

    callbacks = callbacks or [None] * len(requests)
    return [Item(pipe, contextlib.nullcontext(), r, c) for r, c in zip(requests, callbacks)]


@pytest.mark.parametrize("scheduler", ["euler-a", "dpm++2m-sde", "pndm"])
def test_batch_of_three_equals_each_alone(pipe, scheduler):
    from runtime.serve.batching import run_batch

    requests = [req("a lighthouse at dusk", 1, scheduler=scheduler),
                req("a (red:1.3) car", 22, negative_prompt="blurry", scheduler=scheduler),
                req("two cats", (5, 9), num_images_per_prompt=2, negative_prompt="ugly", scheduler=scheduler)]
    counting = Counting(pipe)
    outs = run_batch(items(counting, requests))
    assert counting.calls == [4], "the three requests should run as one call of 4 images"
    for out, r in zip(outs, requests):
        alone = pipe.run(r).images
        assert out.images.shape == alone.shape
        assert np.abs(out.images - alone).max() <= 1e-3, (scheduler, r.prompt)
        assert out.sampler == pipe.run(r).sampler


def test_images_of_a_batch_differ_by_seed_and_prompt(pipe):
    from runtime.serve.batching import run_batch

    outs = run_batch(items(pipe, [req("a cat", 1), req("a cat", 2), req("a dog", 1)]))
    a, b, c = (o.images for o in outs)
    assert np.abs(a - b).max() > 0.05 and np.abs(a - c).max() > 0.05


def test_incompatible_requests_are_not_merged(pipe):
    from runtime.serve.batching import _groups

    base = req("a cat", 1)
    long_prompt = ", ".join(["a very detailed painting of a lighthouse"] * 12)          # 2 chunks of 75 tokens
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    others = [req("a cat", 2, num_inference_steps=STEPS + 1), req("a cat", 2, width=2 * SIZE),
              req("a cat", 2, guidance_scale=3.0), req("a cat", 2, scheduler="euler"),
              req("a cat", 2, negative_prompt=None), req("a cat", 2, prompt_syntax="plain"),
              req(long_prompt, 2), req("a cat", 2, negative_prompt=long_prompt),
              req("a cat", 2, clip_skip=2), req("a cat", 2, image=image, strength=0.5),
              req("a cat", 3, num_images_per_prompt=2)]                                # one noise stream, 2 images
    groups = _groups(items(pipe, [base, *others]))
    assert [len(g) for g in groups] == [1] * (1 + len(others))
    same = [req("a dog", 7), req(", ".join(["a cat"] * 3), 8, negative_prompt="blurry, ugly")]
    assert [len(g) for g in _groups(items(pipe, [base, *same]))] == [3]


def test_same_init_image_merges_and_matches(pipe):
    from runtime.serve.batching import run_batch

    image = Image.new("RGB", (SIZE, SIZE), (30, 90, 200))
    requests = [req("a cat", 1, image=image.copy(), strength=0.6), req("a dog", 2, image=image.copy(), strength=0.6)]
    counting = Counting(pipe)
    outs = run_batch(items(counting, requests))
    assert counting.calls == [2]
    for out, r in zip(outs, requests):
        assert np.abs(out.images - pipe.run(r).images).max() <= 1e-3


def test_failed_batch_runs_each_request_alone(pipe):
    from runtime.serve.batching import run_batch

    counting = Counting(pipe, fail_batches=True)
    outs = run_batch(items(counting, [req("a cat", 1), req("a dog", 2)]))
    assert counting.calls == [2, 1, 1]
    assert all(o.images.shape == (1, SIZE, SIZE, 3) for o in outs)


def test_batch_queue_merges_concurrent_runs_and_reports_each(pipe):
    from runtime.serve.batching import BatchQueue

    queue = BatchQueue(max_batch=3, wait_ms=5000)
    counting = Counting(pipe)
    requests = [req(f"a cat number {i}", 10 + i) for i in range(3)]
    seen = {i: [] for i in range(3)}

    def submit(i):
        return queue.run(counting, contextlib.nullcontext(), requests[i],
                         lambda n, total, t, x, i=i: seen[i].append(x.shape[0]))
    start = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(submit, range(3)))
    queue.close()
    assert time.monotonic() - start < 5, "a full batch should start without waiting for the timeout"
    assert counting.calls == [3]
    assert all(s == [1] * STEPS for s in seen.values())
    for out, r in zip(outs, requests):
        assert np.abs(out.images - pipe.run(r).images).max() <= 1e-3


def test_server_with_max_batch_answers_as_without(tiny_export):
    pytest.importorskip("fastapi")
    from runtime.serve.settings import ServeSettings
    from serve_util import Served, decode_png

    body = {"prompt": "a lighthouse", "steps": STEPS, "width": SIZE, "height": SIZE, "sampler_name": "Euler a",
            "cfg_scale": 7}
    results = {}
    for max_batch in (1, 3):
        served = Served(ServeSettings(tiny_export[0], threads=1, max_batch=max_batch, batch_wait_ms=2000))
        try:
            with ThreadPoolExecutor(3) as pool:
                replies = list(pool.map(lambda s: served.post("/sdapi/v1/txt2img", body | {"seed": s}), (1, 2, 3)))
        finally:
            served.stop()
        assert all(r.status == 200 for r in replies), [r.text for r in replies]
        results[max_batch] = [decode_png(r.body["images"][0]) for r in replies]
    for (alone, text_a), (batched, text_b) in zip(results[1], results[3]):
        assert np.abs(alone.astype(int) - batched.astype(int)).max() <= 1 and text_a == text_b


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _txt2img(url: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + "/sdapi/v1/txt2img", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


def _generated(folder, tmp_path, prompt: str, seeds: list) -> list:
    """`runtime generate` with the A1111 settings the requests use: one image per seed."""
    from click.testing import CliRunner

    from runtime.cli import main

    out = tmp_path / f"{prompt.replace(' ', '_')}.png"
    args = ["generate", "--model", str(folder), "--prompt", prompt, "--steps", str(STEPS), "--width", str(SIZE),
            "--height", str(SIZE), "--guidance", "7", "--scheduler", "Euler a", "--prompt-syntax", "a1111",
            "--seed", ",".join(map(str, seeds)), "--batch", str(len(seeds)), "--quiet", "--out", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [np.asarray(Image.open(tmp_path / f"{out.stem}-{i + 1}.png").convert("RGB")) for i in range(len(seeds))]


def _alive(pids) -> list:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.ray
def test_ray_serve_two_replicas_match_runtime_generate(tiny_export, tmp_path):
    ray = pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from ray import serve

    from runtime.serve import ray as ray_serve
    from runtime.serve.settings import ServeSettings

    settings = ServeSettings(tiny_export[0], port=_free_port(), threads=1, max_batch=2, batch_wait_ms=50)
    url = f"http://127.0.0.1:{settings.port}"
    prompts = {"a lighthouse at dusk": [11, 12, 13, 14], "a red car": [21, 22, 23, 24]}
    jobs = [(p, s) for p, seeds in prompts.items() for s in seeds]
    before = {p.pid for p in psutil.Process().children(recursive=True)}   # e.g. multiprocessing's resource tracker
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        ray_serve.deploy(settings, replicas=2)
        started = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert {"raylet", "gcs_server"} <= {psutil.Process(p).name() for p in _alive(started)}
        body = {"steps": STEPS, "width": SIZE, "height": SIZE, "sampler_name": "Euler a", "cfg_scale": 7}
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: _txt2img(url, body | {"prompt": job[0], "seed": job[1]}), jobs))
        bad = urllib.request.Request(url + "/sdapi/v1/txt2img", json.dumps(body | {"width": SIZE + 1}).encode(),
                                     {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 422 and json.loads(refused.value.read())["field"] == "width"
        status = serve.status().applications[ray_serve.APP_NAME].deployments["RuntimeServe"]
        assert status.replica_states.get("RUNNING") == 2, status.replica_states
        handle = serve.get_app_handle(ray_serve.APP_NAME)
        described = [handle.describe.remote().result() for _ in range(8)]
        assert not any(d["torch_loaded"] for d in described) and all(d["threads"] == 1 for d in described)
    finally:
        ray_serve.stop(own_cluster=True)
    expected = {p: _generated(tiny_export[0], tmp_path, p, seeds) for p, seeds in prompts.items()}
    for (prompt, seed), reply in zip(jobs, replies):
        with Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))) as im:
            got, text = np.asarray(im.convert("RGB")), im.info["parameters"]
        want = expected[prompt][prompts[prompt].index(seed)]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (prompt, seed)
        assert f"Seed: {seed}," in text and "Sampler: Euler a" in text
    deadline = time.time() + 30
    while _alive(started) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(started), [psutil.Process(p).cmdline()[:2] for p in _alive(started)]


def test_config_file_and_builder(tiny_export):
    pytest.importorskip("ray")
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from runtime.errors import UserError
    from runtime.serve import ray as ray_serve

    config = yaml.safe_load((Path(ray_serve.__file__).parent / "ray_serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)                                 # Ray's own schema accepts the file
    app = config["applications"][0]
    assert app["import_path"] == "runtime.serve.ray:build_app"
    args = app["args"] | {"model": str(tiny_export[0])}
    assert isinstance(ray_serve.build_app(args), Application)
    assert isinstance(ray_serve.build_app({"model": str(tiny_export[0]), "threads": "2", "replicas": "3"}),
                      Application)                                        # `serve run ... k=v` passes strings
    with pytest.raises(UserError, match="unknown argument.*thread\\b"):
        ray_serve.build_app({"model": str(tiny_export[0]), "thread": 2})
    with pytest.raises(UserError, match="--autoscale"):
        ray_serve.parse_autoscale("4:2")


def test_replica_options_follow_threads_batching_and_target(tiny_export):
    pytest.importorskip("ray")
    from runtime.serve import ray as ray_serve
    from runtime.serve.settings import ServeSettings

    settings = ServeSettings(tiny_export[0], threads=2, max_batch=4, queue=3)
    fixed = ray_serve.replica_options(settings, replicas=3)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["max_ongoing_requests"] == 4 + 3 + ray_serve.LIGHT_REQUESTS
    scaled = ray_serve.replica_options(settings, autoscale=(1, 5))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 4}
    gpu = ray_serve.replica_options(ServeSettings(tiny_export[0], provider="cuda"))
    assert gpu["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert ray_serve.with_threads(ServeSettings(tiny_export[0]), 2).threads >= 1


@pytest.mark.parametrize("options, words", [
    (["--replicas", "2"], "need --ray"),
    (["--ray", "--autoscale", "3:1"], "--autoscale takes MIN:MAX"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "not both"),
    (["--max-batch", "0"], "--max-batch must be an integer >= 1"),
])
def test_serve_ray_options_are_checked(tiny_export, options, words):
    pytest.importorskip("ray")
    from click.testing import CliRunner

    from runtime.cli import main

    result = CliRunner().invoke(main, ["serve", "--model", str(tiny_export[0]), *options])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] and words in result.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_serve_ray_cli_serves_and_stops_cleanly_on_ctrl_c(tiny_export, tmp_path):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    import signal
    import subprocess
    import sys

    port, log = _free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "runtime", "serve", "--model", str(tiny_export[0]), "--ray", "--replicas", "2",
           "--threads", "1", "--max-batch", "2", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None and time.time() < deadline, log.read_text(errors="replace")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        started = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        reply = _txt2img(f"http://127.0.0.1:{port}", {"prompt": "a cat", "steps": STEPS, "width": SIZE,
                                                       "height": SIZE, "seed": 3})
        assert len(reply["images"]) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.time() + 30
    while _alive(started) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(started), [psutil.Process(p).cmdline()[:2] for p in _alive(started)]
    assert "stopped" in log.read_text(errors="replace")
