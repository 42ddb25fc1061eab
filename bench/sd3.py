"""SD 3.x benchmarks. `--full-transformer`: an SD 3.5 Medium-size MMDiT transformer with random weights, exported
as `sdexport convert` exports it (TorchScript trace at the convert's first sample case, the cpu profile's opset,
one external data file): export time and peak RSS, then one call in torch and in onnxruntime on the same inputs.

Each phase (export, torch call, onnxruntime call) runs in its own process, watched for peak RSS, so the numbers
do not add up each other's memory. `--layers` scales the transformer down when the full 24 layers do not fit.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT = Path(__file__).parent / "results" / "sd3_transformer_full.json"
SD35_MEDIUM = dict(      # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16, "in_channels": 3}
CALL_TEXT = 77 + 256                      # CLIP tokens + T5 tokens of a max_sequence_length=256 prompt


def configs(layers: int) -> dict:
    """The transformer config with `layers` blocks (the first 13 with dual attention, as 3.5 Medium)."""
    t = SD35_MEDIUM | {"num_layers": layers, "dual_attention_layers": tuple(range(min(13, layers)))}
    return {"transformer": t, "vae": VAE}


def build(layers: int):
    """The seeded random-weight SD3Transformer2DModel."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**configs(layers)["transformer"]).eval().requires_grad_(False)


def feeds(layers: int, case: tuple) -> dict:
    """The spec's deterministic sample inputs (torch tensors) at (batch, height, width, text tokens)."""
    from sdexport.specs import TRANSFORMER, dims

    return TRANSFORMER.sample_inputs(dims(configs(layers), *case))


def export_case(layers: int) -> tuple:
    """(batch, height, width, text tokens) that `sdexport convert` traces the transformer at (its first case)."""
    from sdexport.specs import TRANSFORMER

    return tuple(TRANSFORMER.sample_cases(configs(layers))[0])


def export_phase(args) -> dict:
    """Build and export as convert does (export_component, the cpu profile's opset); every axis stays dynamic."""
    from sdexport.export import export_component
    from sdexport.profiles import load_profile
    from sdexport.specs import TRANSFORMER

    t0 = time.perf_counter()
    model = build(args.layers)
    built = time.perf_counter()
    export_component(TRANSFORMER, model, feeds(args.layers, export_case(args.layers)), args.work / "transformer",
                     opset=load_profile("cpu").opset)
    done = time.perf_counter()
    size = sum(f.stat().st_size for f in (args.work / "transformer").iterdir() if f.is_file())
    return {"params": sum(p.numel() for p in model.parameters()), "build_s": built - t0, "export_s": done - built,
            "onnx_bytes": size}


def torch_phase(args) -> dict:
    """One call in torch eager (after a first call), output saved for the comparison."""
    import torch

    from .unet_variants import timed_calls

    model, x = build(args.layers), feeds(args.layers, args.case)
    with torch.no_grad():
        r = timed_calls(lambda: model(**x, return_dict=False)[0].numpy(), args.repeats)
    np.save(args.work / "torch.npy", r.pop("output"))
    return r


def ort_phase(args) -> dict:
    """Session creation and one call of the exported fp32 graph on the CPU provider (level ALL)."""
    import onnxruntime as ort

    from .unet_variants import timed_calls

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(args.work / "transformer" / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    created = time.perf_counter() - t0
    x = {k: v.numpy() for k, v in feeds(args.layers, args.case).items()}
    r = timed_calls(lambda: session.run(["out_hidden_states"], x)[0], args.repeats)
    np.save(args.work / "ort.npy", r.pop("output"))
    return {"session_create_s": created} | r


PHASES = {"export": export_phase, "torch": torch_phase, "ort": ort_phase}


def run_phase(name: str, args) -> dict:
    """One phase in a child process: its result, wall time, peak RSS (GB) and the memory free before it."""
    import psutil

    from .watch import watch

    result, log = args.work / f"{name}.json", args.work / f"{name}.log"
    cmd = [sys.executable, "-m", "bench.sd3", "--phase", name, "--work", str(args.work), "--layers",
           str(args.layers), "--size", str(args.size), "--repeats", str(args.repeats)]
    free = {"available_gb_before": psutil.virtual_memory().available / 2**30}
    rc, peak_mb, wall, _ = watch(cmd, log)
    if rc != 0:
        return {"error": f"exit {rc}: {log.read_text()[-1500:]}", "peak_rss_gb": peak_mb / 1024, "wall_s": wall,
                **free}
    return json.loads(result.read_text()) | {"peak_rss_gb": peak_mb / 1024, "wall_s": wall, **free}


def main(argv=None) -> int:
    """Export, time torch and onnxruntime, print the benchmark line, write bench/results/sd3_transformer_full.json."""
    p = argparse.ArgumentParser(prog="python -m bench.sd3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-transformer", action="store_true", help="the full-size transformer benchmark")
    p.add_argument("--layers", type=int, default=24, help="transformer blocks (SD 3.5 Medium: 24)")
    p.add_argument("--size", type=int, default=512, help="image size of the timed call (batch 2: guidance)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls after the first")
    p.add_argument("--result", type=Path, default=RESULT)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.case = (2, args.size, args.size, CALL_TEXT)
    if args.phase:
        (args.work / f"{args.phase}.json").write_text(json.dumps(PHASES[args.phase](args)))
        return 0
    if not args.full_transformer:
        p.error("choose a benchmark: --full-transformer")
    if not 1 <= args.layers <= SD35_MEDIUM["num_layers"] or args.size <= 0 or args.size % 16 or args.repeats < 1:
        p.error("--layers must be in [1, 24], --size a positive multiple of 16, --repeats at least 1")
    report = full_transformer(args)
    print(summary(report))
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any("error" in r for r in report.values() if isinstance(r, dict)) else 0


def full_transformer(args) -> dict:
    """Every phase in a scratch folder (removed afterwards, graph files included), then ORT vs torch outputs."""
    import os

    from .__main__ import environment
    from .cpuinfo import cpu_info

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sd3-bench-") as tmp:
        args.work = Path(tmp)
        report = {name: run_phase(name, args) for name in PHASES}
        if not any("error" in r for r in report.values()):
            a, b = np.load(args.work / "ort.npy"), np.load(args.work / "torch.npy")
            report["max_abs_ort_vs_torch"] = float(np.abs(a - b).max())
            report["torch_output_max_abs"] = float(np.abs(b).max())
    return report | {"layers": args.layers, "full_layers": SD35_MEDIUM["num_layers"],
                     "config": configs(args.layers)["transformer"], "call_case": list(args.case),
                     "export_case": list(export_case(args.layers)), "cpu_info": cpu_info(),
                     "load_avg_1m": [load_before, os.getloadavg()[0]], "environment": environment("local").to_dict()}


def summary(r: dict) -> str:
    """The benchmark line."""
    e, t, o = r["export"], r["torch"], r["ort"]
    if any("error" in x for x in (e, t, o)):
        return "sd3 bench failed: " + "; ".join(f"{k}: {x['error'][:300]}" for k, x in
                                                (("export", e), ("torch", t), ("ort", o)) if "error" in x)
    return (f"SD3.5-Medium transformer, {r['layers']}/{r['full_layers']} layers, {e['params'] / 1e9:.2f} B params: "
            f"export {e['export_s']:.0f} s, peak RSS {e['peak_rss_gb']:.1f} GB; one call batch {r['call_case'][0]} "
            f"{r['call_case'][1]}px: torch {t['call_s']:.1f} s (peak {t['peak_rss_gb']:.1f} GB), onnxruntime "
            f"{o['call_s']:.1f} s ({t['call_s'] / o['call_s']:.2f}x, peak {o['peak_rss_gb']:.1f} GB), "
            f"max abs {r['max_abs_ort_vs_torch']:.2e}")


if __name__ == "__main__":
    sys.exit(main())
