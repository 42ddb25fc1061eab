"""Serving throughput: images/min and p50/p95 latency of `runtime serve` on Ray Serve, by replicas x threads and
with or without dynamic batching, against the plain server on the same machine.

python -m bench.ray_serve --model DIR [--model DIR2] [--size 128] [--steps 10] [--requests 24] [--clients 4]
    [--max-batch 4] [--out bench/results/ray]
Writes results.json, report.md and throughput.png. Each configuration serves the same load: `clients` threads
sending A1111 txt2img requests back to back (distinct prompts and seeds, batch-compatible settings) until
`requests` are answered, after one warm-up request per replica. The Ray configurations share one local cluster of
os.cpu_count() CPUs; the plain server runs as a `runtime serve` subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.cpuinfo import cpu_info, describe


@dataclass(frozen=True)
class Config:
    """One serving set-up."""
    kind: str            # "ray" or "plain"
    replicas: int
    threads: int
    max_batch: int

    @property
    def label(self) -> str:
        batch = f", batch {self.max_batch}" if self.max_batch > 1 else ""
        return f"{self.kind} {self.replicas}x{self.threads}t{batch}"


def configs(cores: int, max_batch: int) -> list[Config]:
    """1 replica x 1 thread, N replicas x 1 thread, 1 replica x N threads (N = cores), each with and without
    batching, on Ray; the plain server with 1 and N threads as the reference."""
    shapes = [("plain", 1, 1), ("plain", 1, cores), ("ray", 1, 1), ("ray", cores, 1), ("ray", 1, cores)]
    return [Config(k, r, t, b) for k, r, t in shapes for b in (1, max_batch)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> float:
    """Seconds for one txt2img request (raises on a non-200 answer)."""
    start = time.perf_counter()
    req = urllib.request.Request(url + "/sdapi/v1/txt2img", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        assert len(json.loads(r.read())["images"]) == 1
    return time.perf_counter() - start


def _wait_up(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/sdapi/v1/sd-models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no server at {url} after {timeout} s")


def load(url: str, body: dict, requests: int, clients: int) -> dict:
    """Send `requests` requests from `clients` threads; images/min and latency percentiles."""
    bodies = [body | {"prompt": f"{body['prompt']} number {i}", "seed": 1000 + i} for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda b: _post(url, b), bodies))
    wall = time.perf_counter() - start
    return {"images_per_min": 60 * requests / wall, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "wall_s": wall}


def run_plain(model: Path, cfg: Config, body: dict, args) -> dict:
    """The plain `runtime serve` subprocess under the load."""
    port = _free_port()
    cmd = [sys.executable, "-m", "runtime", "serve", "--model", str(model), "--port", str(port), "--threads",
           str(cfg.threads), "--max-batch", str(cfg.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--queue", str(args.requests)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_up(url)
        _post(url, body)                                                 # warm-up
        return load(url, body, args.requests, args.clients)
    finally:
        proc.terminate()
        proc.wait(60)


def run_ray(model: Path, cfg: Config, body: dict, args) -> dict:
    """The Ray Serve deployment (on the bench's cluster) under the load."""
    from ray import serve

    from runtime.serve import ray as ray_serve
    from runtime.serve.settings import ServeSettings

    settings = ServeSettings(model, port=args.port, threads=cfg.threads, max_batch=cfg.max_batch,
                             batch_wait_ms=args.batch_wait_ms, queue=args.requests)
    ray_serve.deploy(settings, replicas=cfg.replicas)
    try:
        url = f"http://127.0.0.1:{args.port}"
        with ThreadPoolExecutor(cfg.replicas) as pool:                   # warm every replica
            list(pool.map(lambda _: _post(url, body), range(2 * cfg.replicas)))
        return load(url, body, args.requests, args.clients)
    finally:
        serve.delete(ray_serve.APP_NAME)


def chart(rows: list, path: Path) -> None:
    """Horizontal bars of images/min per configuration and model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 1.5 + 0.4 * len(rows)), layout="constrained")
    ax = fig.subplots()
    labels = [f"{r['model']}: {r['label']}" for r in rows]
    ax.barh(labels, [r["images_per_min"] for r in rows], color=["#4c72b0" if r["kind"] == "ray" else "#999999"
                                                                for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("images / min (higher is better)")
    ax.set_title("runtime serve throughput: Ray Serve replicas x threads, dynamic batching")
    fig.savefig(path, dpi=100, metadata={"Software": None})


def markdown(result: dict) -> str:
    """The report: environment, the table, and what it predicts for N machines."""
    lines = ["# runtime serve on Ray Serve: throughput and latency", "",
             f"CPU: {result['cpu_line']} ({result['cores']} cores). Ray {result['ray']}, onnxruntime "
             f"{result['onnxruntime']}. Load: {result['requests']} A1111 txt2img requests from {result['clients']} "
             f"clients, {result['size']}x{result['size']}, {result['steps']} steps, Euler a, batch wait "
             f"{result['batch_wait_ms']} ms. Load average before the run: "
             f"{', '.join(f'{x:.1f}' for x in result.get('load_average_before', ()))} (other jobs shared the "
             "cores when it is above 0: compare rows of one run, not seconds).", "",
             "| model | server | replicas x threads | max batch | images/min | p50 s | p95 s |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['kind']} | {r['replicas']} x {r['threads']} | {r['max_batch']} | "
                     f"{r['images_per_min']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} |")
    lines += ["", "![throughput](throughput.png)", "", *scaling_note(result)]
    return "\n".join(lines) + "\n"


def scaling_note(result: dict) -> list:
    """What the numbers predict for N machines: replicas scale out, the per-machine rate is the best row here."""
    models = dict.fromkeys(r["model"] for r in result["rows"] if r["kind"] == "ray")
    if not models:
        return []
    per_model = []
    for model in models:
        rays = [r for r in result["rows"] if r["kind"] == "ray" and r["model"] == model]
        best = max(rays, key=lambda r: r["images_per_min"])
        one = next((r for r in rays if r["replicas"] == 1 and r["threads"] == 1 and r["max_batch"] == 1), best)
        per_model.append(f"{model}: best {best['label']} at {best['images_per_min']:.1f} images/min "
                         f"({best['images_per_min'] / result['cores']:.1f} per core), one 1-thread replica "
                         f"{one['images_per_min']:.1f}, so N machines of this kind about N x "
                         f"{best['images_per_min']:.1f}")
    return ["## Scaling to N machines", "",
            "Best per model here — " + "; ".join(per_model) + ". Replicas share nothing but the HTTP proxy (one per "
            "node with `proxy_location: EveryNode`), so N machines with one replica per core scale the per-machine "
            "rate N-fold while at least two requests per replica are in flight (Ray routes each request to the "
            "less busy of two replicas); latency stays that of one replica. Limits: each node holds a full copy of the model per replica (RAM), the load balancer puts "
            "requests behind busy replicas when clients send fewer than replicas, and per-replica state "
            "(progress, model switching) does not follow a client across replicas. " + batching_note(result), ""]


def batching_note(result: dict) -> str:
    """Batched vs unbatched images/min per configuration, as measured."""
    rows = {(r["model"], r["kind"], r["replicas"], r["threads"], r["max_batch"] > 1): r for r in result["rows"]}
    ratios = [rows[k[:-1] + (True,)]["images_per_min"] / r["images_per_min"] for k, r in rows.items()
              if not k[-1] and k[:-1] + (True,) in rows]
    if not ratios:
        return ""
    return (f"Dynamic batching changed throughput by x{min(ratios):.2f} to x{max(ratios):.2f} here (batched / "
            "unbatched, same configuration): on CPU a batch costs about its images' sum of UNet work, so it gains "
            "only what per-call overhead it saves; on a GPU, where one image leaves the device idle, it is the main "
            "throughput lever.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", type=Path, required=True, help="an exported folder (repeatable)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--batch-wait-ms", type=int, default=50)
    p.add_argument("--only", default=None, help="run only configurations whose label contains this text")
    p.add_argument("--out", type=Path, default=Path("bench/results/ray"))
    args = p.parse_args(argv)
    import onnxruntime
    import ray

    cores = os.cpu_count() or 1
    args.port = _free_port()
    info = cpu_info()
    result = {"cpu": info, "cpu_line": describe(info), "cores": cores, "ray": ray.__version__,
              "load_average_before": os.getloadavg(),
              "onnxruntime": onnxruntime.__version__, "size": args.size, "steps": args.steps,
              "requests": args.requests, "clients": args.clients, "batch_wait_ms": args.batch_wait_ms, "rows": []}
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for model in args.model:
            body = {"prompt": "a lighthouse at dusk", "steps": args.steps, "width": args.size, "height": args.size,
                    "sampler_name": "Euler a", "cfg_scale": 7}
            for cfg in configs(cores, args.max_batch):
                if args.only and args.only not in cfg.label:
                    continue
                numbers = (run_ray if cfg.kind == "ray" else run_plain)(model, cfg, body, args)
                row = {"model": model.name, "label": cfg.label, **asdict(cfg), **numbers}
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result["rows"], args.out / "throughput.png")
    (args.out / "report.md").write_text(markdown(result))
    print(f"wrote {args.out}/results.json, report.md, throughput.png")


if __name__ == "__main__":
    main()
