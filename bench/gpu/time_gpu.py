"""Time text-to-image end to end: exported folders in the runtime vs diffusers (SDPA) on the same device.

Median of `--runs` timed calls per step count, after one untimed warm-up call (session/engine set-up,
cuDNN algorithm search and CUDA-graph capture land in the warm-up). Results are rewritten to `--out`
after every measurement, so a run killed by a timeout leaves what it had measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPT = "a lighthouse at dusk, oil painting"


def _save(out: Path, results: dict) -> None:
    out.write_text(json.dumps(results, indent=2))


def _measure(call, steps: list[int], runs: int, sync=lambda: None) -> dict:
    """{steps: {median_s, runs_s, warmup_s}} for one callable taking a step count."""
    res = {}
    for n in steps:
        t0 = time.perf_counter()
        call(n)
        sync()
        warm = time.perf_counter() - t0
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call(n)
            sync()
            times.append(time.perf_counter() - t0)
        res[str(n)] = {"median_s": statistics.median(times), "runs_s": times, "warmup_s": warm}
    return res


def time_runtime(folder: Path, provider: str, size: int, steps: list[int], runs: int) -> dict:
    """The torch-free runtime on an exported folder (session settings, IO binding / CUDA graph, from its manifest)."""
    from runtime.pipeline import StableDiffusionPipeline
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider=provider)
    load = time.perf_counter() - t0
    call = lambda n: pipe(PROMPT, height=size, width=size, num_inference_steps=n, seed=0, output_type="np")
    res = _measure(call, steps, runs)
    return {"load_s": load, "steps": res, "session_config": repr(pipe.model.session_config),
            "session_providers": _providers(pipe.model)}


def _providers(model) -> dict:
    """The providers each built graph's session actually got (what fell back to the CPU shows here)."""
    out = {}
    for name, g in getattr(model, "_graphs", {}).items():
        try:
            out[name] = g.session.get_providers()
        except Exception as e:                      # a graph whose session needs fixed dims, etc.
            out[name] = f"unknown ({type(e).__name__})"
    return out


def time_diffusers(folder: Path, device: str, size: int, steps: list[int], runs: int) -> dict:
    """diffusers' StableDiffusionPipeline, fp16 on CUDA (fp32 on CPU), attention through torch SDPA."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def call(n):
        g = torch.Generator("cpu").manual_seed(0)
        with torch.inference_mode():
            pipe(PROMPT, height=size, width=size, num_inference_steps=n, generator=g, output_type="np")
    res = _measure(call, steps, runs, sync)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"load_s": load, "steps": res, "dtype": str(dtype), "attention": "AttnProcessor2_0 (SDPA)",
            "torch": torch.__version__, "peak_cuda_bytes": peak}


def main(argv=None) -> int:
    """CLI: time each --onnx LABEL=DIR and the --diffusers folder, write JSON."""
    p = argparse.ArgumentParser(prog="python bench/gpu/time_gpu.py", description=__doc__)
    p.add_argument("--onnx", action="append", default=[], metavar="LABEL=DIR", help="an exported folder to time")
    p.add_argument("--diffusers", type=Path, help="the diffusers folder the exports came from")
    p.add_argument("--provider", default="cuda")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", default="25,50")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    steps = [int(s) for s in a.steps.split(",")]
    results = {"size": a.size, "runs": a.runs, "provider": a.provider, "device": a.device, "timings": {}}
    jobs = [(label, lambda d=Path(d): time_runtime(d, a.provider, a.size, steps, a.runs))
            for label, d in (o.split("=", 1) for o in a.onnx)]
    if a.diffusers:
        jobs.append(("diffusers", lambda: time_diffusers(a.diffusers, a.device, a.size, steps, a.runs)))
    ok = True
    for label, job in jobs:
        try:
            results["timings"][label] = job()
        except Exception as e:                      # keep going: one failing mode must not hide the others
            results["timings"][label] = {"error": f"{type(e).__name__}: {e}"}
            ok = False
        _save(a.out, results)
    base = results["timings"].get("diffusers", {}).get("steps", {})
    results["speedup_vs_diffusers"] = {
        label: {n: base[n]["median_s"] / r["steps"][n]["median_s"] for n in base if n in r.get("steps", {})}
        for label, r in results["timings"].items() if label != "diffusers" and "steps" in r}
    _save(a.out, results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
