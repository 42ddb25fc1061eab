"""ControlNet cost on the full-size SD 1.5 architecture (random weights): export time and per-step cost.

Exports SD 1.5 with one ControlNet for the cpu target (a subprocess watched for peak RSS; stage times from the
convert's progress callback), then times denoising steps at 512x512 with guidance (batch 2 through each graph):
plain (the `unet` graph), with a control image (ControlNet + `unet_controlled`), and `unet_controlled` fed zero
residuals — what a single UNet graph with residual inputs would cost requests without a control image.
Run it alone on the machine: `python -m bench.controlnet` (the convert peaks near the UNet optimizer's 14 GB).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT = Path(__file__).parent / "results" / "controlnet.json"
SIZE, STEPS = 512, 3


def controlnet_folder() -> Path:
    """A full-size SD 1.5 ControlNet (ControlNetModel.from_unet, output convs random), built once into the cache."""
    from sdexport.cache import cache_dir, cached_folder

    def build(dest: Path) -> None:
        import torch
        from diffusers import ControlNetModel

        from .models import sd15_unet

        net = ControlNetModel.from_unet(sd15_unet())
        torch.manual_seed(5)
        with torch.no_grad():
            for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
                for p in m.parameters():
                    p.normal_(0.0, 0.02)
        net.save_pretrained(dest)
    return cached_folder(cache_dir() / "sd15-random-controlnet-v1", build)


def convert_child(out: Path, result: Path) -> None:
    """The convert, with the time each stage (export / verify / optimise per graph) started."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    from .models import sd15_folder

    folder, net = sd15_folder(), controlnet_folder()
    stages, t0 = [], time.perf_counter()
    convert(ConvertConfig(str(folder), load_profile("cpu"), out, force=True, controlnets=(str(net),)),
            lambda stage: stages.append((stage, time.perf_counter() - t0)))
    stages.append(("done", time.perf_counter() - t0))
    result.write_text(json.dumps(stages))


def graph_seconds(stages: list) -> dict:
    """Seconds per graph (export + verify + optimise) from the stage log."""
    out = {}
    for (stage, start), (_, end) in zip(stages, stages[1:]):
        words = stage.split()
        if words[0] in ("exporting", "verifying", "optimising"):
            out[words[1]] = out.get(words[1], 0.0) + end - start
    return {k: round(v, 1) for k, v in out.items()}


def measure_convert(out: Path) -> dict:
    """Run the convert in a watched subprocess: wall time, peak RSS, per-graph seconds."""
    from .watch import watch_json

    stages, peak_mb, wall = watch_json("bench.controlnet", str(out), "--stages", what="convert")
    return {"convert_s": round(wall, 1), "peak_rss_gb": round(peak_mb / 1024, 2), "per_graph_s": graph_seconds(stages)}


def step_times(pipe, **kw) -> list:
    """Seconds of each denoising step of one 512x512 generation (the first includes session creation)."""
    marks = [time.perf_counter()]
    pipe("a lighthouse", num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent", seed=1,
         callback=lambda *a: marks.append(time.perf_counter()), **kw)
    return list(np.diff(marks))


def graph_call(pipe, name: str) -> float:
    """Best-of-STEPS seconds of one call of a UNet graph (batch 2, 64x64 latents), residual inputs zero."""
    g = pipe.model.graph(name)
    lat = SIZE // 8
    feeds = {"sample": np.zeros((2, 4, lat, lat), np.float32), "timestep": np.float32(500),
             "encoder_hidden_states": np.zeros((2, 77, 768), np.float32)}
    for key, spec in g.inputs.items():
        if key not in feeds:                                  # residuals: (2, C, 64/f, 64/f) for "latent_height/f"
            f = int(str(spec.shape[2]).split("/")[1]) if "/" in str(spec.shape[2]) else 1
            feeds[key] = np.zeros((2, spec.shape[1], lat // f, lat // f), np.float32)
    best = float("inf")
    for _ in range(STEPS):
        t = time.perf_counter()
        g(**feeds)
        best = min(best, time.perf_counter() - t)
    return best


def measure_steps(folder: Path) -> dict:
    """Per-step seconds without and with one ControlNet (steps after the first), and the zero-residual UNet."""
    from PIL import Image

    from runtime.pipeline import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    edges = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) > 0.9).astype(np.uint8) * 255)
    plain = step_times(pipe)
    control = step_times(pipe, control_image=edges)
    plain_s, control_s = float(np.median(plain[1:])), float(np.median(control[1:]))
    unet_s, zero_s = graph_call(pipe, "unet"), graph_call(pipe, "unet_controlled")
    return {"plain_step_s": round(plain_s, 2), "controlnet_step_s": round(control_s, 2),
            "ratio": round(control_s / plain_s, 3), "unet_call_s": round(unet_s, 2),
            "zero_residual_unet_s": round(zero_s, 2), "zero_residual_vs_plain": round(zero_s / unet_s, 3),
            "steps": STEPS, "size": SIZE,
            "guidance": True, "first_steps_s": [round(plain[0], 1), round(control[0], 1)]}


def main(argv=None) -> int:
    """Convert, time steps, print a summary, write bench/results/controlnet.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.controlnet", description=__doc__)
    parser.add_argument("--out", type=Path, help="keep the export here (default: a temporary folder)")
    parser.add_argument("--result", type=Path, default=RESULT)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stages", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        convert_child(args.child, args.stages)
        return 0
    from .__main__ import environment

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "sd15-controlnet-cpu"
        report = measure_convert(out) | measure_steps(out)
    report["environment"] = environment("local").to_dict()
    print(f"convert with one ControlNet: {report['convert_s']} s (peak RSS {report['peak_rss_gb']} GB), per graph "
          f"{report['per_graph_s']}")
    print(f"step at {SIZE}x{SIZE}, batch 2: plain {report['plain_step_s']} s, with ControlNet "
          f"{report['controlnet_step_s']} s ({report['ratio']}x); unet_controlled with zero residuals "
          f"{report['zero_residual_unet_s']} s vs unet {report['unet_call_s']} s ({report['zero_residual_vs_plain']}x)")
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
