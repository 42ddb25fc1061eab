"""`runtime serve` throughput: requests/minute and p50/p95 latency at 1, 2, 4 concurrent clients, and the time
a kept-loaded server saves per request against one `runtime generate` process per image.

    python -m bench.serve                          # the tiny model (exported once into the cache), 64x64
    python -m bench.serve --model DIR --size 512   # an exported folder, e.g. a full-size random SD 1.5

The server runs as its own process (`runtime serve --port 0`), the clients are threads sending A1111 txt2img
requests over loopback; writes bench/results/serve/<model>.json and .md with the CPU model and flags.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cpuinfo import cpu_info, describe

RESULTS = Path(__file__).parent / "results" / "serve"
ROOT = Path(__file__).resolve().parent.parent


def tiny_export() -> Path:
    """The tiny model exported for the cpu target, built once into the cache."""
    from sdexport.cache import cache_dir
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    out = cache_dir() / "bench-serve" / "tiny-cpu"
    if not (out / "sdexport.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(ConvertConfig("tiny", load_profile("cpu"), out))
    return out


def start_server(model: Path, workers: int, threads: int) -> tuple[subprocess.Popen, str]:
    """`runtime serve` on a free loopback port; (process, base URL) once it listens."""
    cmd = [sys.executable, "-m", "runtime", "serve", "--model", str(model), "--port", "0", "--workers", str(workers),
           "--threads", str(threads), "--queue", "64"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        found = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return proc, found.group(1)
    raise SystemExit(f"error: the server did not start ({proc.wait()})")


def txt2img(url: str, body: dict) -> float:
    """One request's latency in seconds."""
    req = urllib.request.Request(f"{url}/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as r:
        assert r.status == 200 and json.loads(r.read())["images"]
    return time.perf_counter() - start


def percentile(values: list, q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def load(url: str, body: dict, clients: int, per_client: int) -> dict:
    """clients threads each sending per_client requests (distinct seeds): throughput and latency."""
    bodies = [body | {"seed": 1000 + i} for i in range(clients * per_client)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda b: txt2img(url, b), bodies))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(bodies), "wall_s": wall, "requests_per_min": 60 * len(bodies) / wall,
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
            "mean_s": statistics.fmean(latencies)}


def generate_processes(model: Path, size: int, steps: int, runs: int, threads: int) -> list:
    """Wall time of `runtime generate` processes, one image each, same settings as the server's requests."""
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        for i in range(runs):
            cmd = [sys.executable, "-m", "runtime", "generate", "--model", str(model), "--prompt", "a lighthouse",
                   "--steps", str(steps), "--width", str(size), "--height", str(size), "--seed", str(2000 + i),
                   "--scheduler", "Euler", "--prompt-syntax", "a1111", "--guidance", "7", "--threads", str(threads),
                   "--quiet", "--out", str(Path(work) / f"{i}.png")]
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return times


def markdown(r: dict) -> str:
    """The report table."""
    lines = [f"# runtime serve: {r['model']} {r['size']}x{r['size']}, {r['steps']} steps, workers {r['workers']}", "",
             f"CPU: {describe(r['cpu'])}", "",
             "| clients | requests | req/min | p50 (s) | p95 (s) |", "|---|---|---|---|---|"]
    lines += [f"| {c['clients']} | {c['requests']} | {c['requests_per_min']:.1f} | {c['p50_s']:.2f} | "
              f"{c['p95_s']:.2f} |" for c in r["concurrency"]]
    p = r["processes"]
    lines += ["", f"`runtime generate` process per image: mean {p['mean_s']:.2f} s over {p['runs']} runs; one served "
                  f"request alone: p50 {r['concurrency'][0]['p50_s']:.2f} s; saved per request "
                  f"{p['saved_per_request_s']:.2f} s ({p['speedup']:.1f}x).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the load levels against one server, then the process baseline; write JSON and Markdown."""
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="an exported folder (default: the tiny model, exported once)")
    p.add_argument("--size", type=int, help="image size (default 64 for tiny, else 512)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", default="1,2,4", help="concurrency levels")
    p.add_argument("--requests", type=int, default=6, help="requests per client at each level")
    p.add_argument("--workers", type=int, default=1, help="the server's --workers")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (server and processes)")
    p.add_argument("--process-runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model = args.model or tiny_export()
    size = args.size or (64 if args.model is None else 512)
    body = {"prompt": "a lighthouse", "steps": args.steps, "width": size, "height": size, "sampler_name": "Euler",
            "cfg_scale": 7}
    proc, url = start_server(model, args.workers, args.threads)
    try:
        txt2img(url, body)                                                   # warm-up
        levels = [load(url, body, int(c), args.requests) for c in args.clients.split(",")]
    finally:
        proc.terminate()
        proc.wait(120)
    times = generate_processes(model, size, args.steps, args.process_runs, args.threads)
    mean = statistics.fmean(times)
    result = {"model": "tiny" if args.model is None else model.name, "size": size, "steps": args.steps,
              "workers": args.workers, "threads": args.threads, "cpu": cpu_info(), "concurrency": levels,
              "processes": {"runs": len(times), "times_s": times, "mean_s": mean,
                            "saved_per_request_s": mean - levels[0]["p50_s"], "speedup": mean / levels[0]["p50_s"]}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{result['model']}-{size}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
