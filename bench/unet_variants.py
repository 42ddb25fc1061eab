"""One full-size SD 1.5 UNet call (batch 2, 64x64 latents) in torch eager and several onnxruntime variants."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
STATIC = {"batch": 2, "latent_height": 64, "latent_width": 64, "sequence": 77}


def inputs() -> dict:
    """The UNet feeds: sample (2, 4, 64, 64), a rank-0 timestep, text states (2, 77, 768)."""
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, 4, 64, 64), np.float32), "timestep": np.array(500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768), np.float32)}


def timed_calls(call, repeats: int) -> dict:
    """First call and the median of the repeats after it, with the last output."""
    t0 = time.perf_counter()
    out = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "call_s": statistics.median(times), "output": out}


def torch_eager(feeds: dict, repeats: int) -> dict:
    """The reference: diffusers' UNet in torch eager mode."""
    import torch

    from .models import sd15_unet

    unet = sd15_unet()
    args = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
    with torch.no_grad():
        return timed_calls(lambda: unet(*args, return_dict=False)[0].numpy(), repeats)


def variant_graph(raw: Path, work: Path, name: str, quantize: bool) -> Path:
    """A copy of the raw export with the cpu profile's passes (optionally int8) applied."""
    from sdexport.optimize import optimize_component
    from sdexport.profiles import load_profile
    from sdexport.specs import UNET

    dest = work / name
    if not (dest / "model.onnx").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(raw, dest)
        optimize_component(dest / "model.onnx", UNET, replace(load_profile("cpu"), quantize_unet=quantize))
    return dest / "model.onnx"


def ort_variant(path: Path, feeds: dict, repeats: int, level: str, static: bool) -> dict:
    """Session creation plus timed calls of one graph."""
    import onnxruntime as ort

    from runtime.session import LEVELS

    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.log_severity_level = 3
    for axis, size in (STATIC.items() if static else ()):
        opts.add_free_dimension_override_by_name(axis, size)
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - t0
    return {"session_create_s": created} | timed_calls(lambda: session.run(None, feeds)[0], repeats)


def diff(a: np.ndarray, b: np.ndarray) -> dict:
    """Max abs and relative difference of two outputs."""
    err = np.abs(a.astype(np.float64) - b)
    return {"max_abs": float(err.max()), "rel": float(err.max() / (np.abs(b).max() or 1.0))}


def run(raw: Path, work: Path, repeats: int) -> tuple[dict, dict]:
    """Every variant, one at a time; ratios are torch eager time / variant time; plus int8 vs fp32."""
    feeds = inputs()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = {"torch-eager": pool.apply(torch_eager, (feeds, repeats))}
    fp32, int8 = variant_graph(raw, work, "cpu", False), variant_graph(raw, work, "int8", True)
    plan = {"ort-fp32-nofusion": (raw / "model.onnx", "basic", False),
            "ort-fp32-cpu-dynamic": (fp32, "all", False), "ort-fp32-cpu-static": (fp32, "all", True),
            "ort-int8-dynamic": (int8, "all", False), "ort-int8-static": (int8, "all", True)}
    spawn = multiprocessing.get_context("spawn")
    for name, (path, level, static) in plan.items():
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        with spawn.Pool(1) as pool:            # a fresh process per variant: no arena or session outlives it
            results[name] = pool.apply(ort_variant, (path, feeds, repeats, level, static))
    outputs = {name: r.pop("output") for name, r in results.items()}
    for name, r in results.items():
        r["vs_torch"] = results["torch-eager"]["call_s"] / r["call_s"]
        r["diff_vs_torch"] = None if name == "torch-eager" else diff(outputs[name], outputs["torch-eager"])
    return results, diff(outputs["ort-int8-dynamic"], outputs["ort-fp32-cpu-dynamic"])


def markdown(results: dict, int8_vs_fp32: dict) -> str:
    """The results as a markdown table."""
    lines = ["| variant | session create | first call | call (median) | speed-up vs torch eager | max abs vs torch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        create = f"{r['session_create_s']:.1f} s" if "session_create_s" in r else "-"
        d = "ref" if r["diff_vs_torch"] is None else f"{r['diff_vs_torch']['max_abs']:.3g}"
        lines.append(f"| {name} | {create} | {r['first_s']:.2f} s | {r['call_s']:.2f} s | {r['vs_torch']:.2f}x | "
                     f"{d} |")
    return ("# SD 1.5 UNet, one call, batch 2, 64x64 latents\n\n" + "\n".join(lines) +
            f"\n\nint8 vs fp32 (cpu profile) output: max abs {int8_vs_fp32['max_abs']:.3g}, "
            f"relative {int8_vs_fp32['rel']:.3g}\n")


def main(argv=None) -> int:
    """Export (or reuse) the raw UNet graph, time every variant, write unet_variants.json and .md."""
    from sdexport.cache import cache_dir

    from .export_unet import export_child

    p = argparse.ArgumentParser(prog="python -m bench.unet_variants", description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant after the first")
    p.add_argument("--work", type=Path, default=cache_dir() / "bench-unet-sd15", help="graph cache folder")
    args = p.parse_args(argv)
    raw = args.work / "raw"
    if not (raw / "model.onnx").is_file():
        print("exporting the raw UNet graph ...", file=sys.stderr, flush=True)
        if export_child(raw)["error"]:
            raise SystemExit("error: the UNet export failed; see python -m bench.export_unet")
    results, int8_vs_fp32 = run(raw, args.work, args.repeats)
    for name, r in results.items():
        print(f"{name:<22} {r['call_s']:7.2f} s/call  {r['vs_torch']:5.2f}x vs torch eager", flush=True)
    print(f"int8 vs fp32 max abs {int8_vs_fp32['max_abs']:.3g} (relative {int8_vs_fp32['rel']:.3g})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"repeats": args.repeats, "variants": results, "int8_vs_fp32": int8_vs_fp32}
    (RESULTS / "unet_variants.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "unet_variants.md").write_text(markdown(results, int8_vs_fp32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
