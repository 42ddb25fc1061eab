"""The CPU target's UNet in fp32, dynamic int8 (MatMul) and static int8 (QDQ Conv + MatMul, calibrated on
pipeline activations): UNet call time (batch 2, 64x64 latents) and the final image's PSNR against fp32, one run.

`python -m bench.int8 --cpu-folder DIR [--work DIR] [--steps 4] [--prompts 3] [--repeats 3]` quantises copies of
DIR's UNet (DIR is left as it is) and writes bench/results/int8_static.json. With `--graph vae_decoder` it does the
same for the VAE decoder (static QDQ only, calibrated on the pipeline's final latents; decoder call at 64x64
latents, 512x512 pixels) and writes bench/results/int8_vae.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from runtime.manifest import MANIFEST_NAME

from .unet_variants import diff, inputs, timed_calls

RESULTS = Path(__file__).parent / "results"


def variant_folder(src: Path, dest: Path, component: str = "unet") -> Path:
    """dest: src's other entries linked, a copy of `component`/, no manifest (the copy's graph changes, so the
    source's hashes would not hold)."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / component).mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name not in (component, MANIFEST_NAME):
            os.symlink(entry.resolve(), dest / entry.name)
    for f in (src / component).iterdir():     # copies: onnx refuses external data behind a link of either kind
        if f.is_file():
            shutil.copy2(f, dest / component / f.name)
    return dest


def unet_time(folder: Path, repeats: int) -> dict:
    """Session creation and the median UNet call of the folder's graph, with its output."""
    from runtime.model import open_model

    t = time.perf_counter()
    graph = open_model(folder, provider="cpu", verify=False).graph("unet")
    created = time.perf_counter() - t
    feeds = {k: graph.cast(k, v) for k, v in inputs().items()}
    out = timed_calls(lambda: graph(**feeds)["out_sample"], repeats)
    return out | {"session_s": created}


def image(folder: Path, s) -> "object":
    """The gate prompt's image through the runtime pipeline, the settings' steps and seed."""
    from runtime.model import open_model
    from runtime.pipeline import StableDiffusionPipeline
    from sdexport.quantize import _image

    return _image(StableDiffusionPipeline(open_model(folder, provider="cpu", verify=False, one_shot=True)),
                  s.gate_prompt, s, s.size)


def build(src: Path, work: Path, profile, progress) -> dict:
    """{variant: folder}: fp32 as exported, dynamic int8, static int8 (with its PSNR gate's check)."""
    from sdexport.quantize import quantize_dynamic_int8

    folders = {"fp32": src}
    dynamic = variant_folder(src, work / "dynamic")
    progress("dynamic int8: quantising MatMul weights")
    quantize_dynamic_int8(dynamic / "unet" / "model.onnx")
    folders["int8 dynamic (MatMul)"] = dynamic
    folders["int8 static (QDQ Conv+MatMul)"], gate = static_variant(src, work / "static", "unet", profile, progress)
    return {"folders": folders, "gate": gate}


def static_variant(src: Path, dest: Path, component: str, profile, progress) -> tuple:
    """(folder, gate): a copy of src with `component` statically quantised, and its PSNR gate's record."""
    from sdexport.quantize import static_int8

    static = variant_folder(src, dest, component)
    t = time.perf_counter()
    installed, check = static_int8(static, profile, progress)[component]
    return static, check.to_dict() | {"installed": installed, "calibrate_s": time.perf_counter() - t}


def _finite(db: float):
    """A PSNR for JSON: None for identical images (infinite)."""
    return None if db == float("inf") else db


def decoder_time(folder: Path, repeats: int) -> dict:
    """Session creation and the median VAE decoder call (1 x 4 x 64 x 64 latents) of the folder's graph."""
    import numpy as np

    from runtime.model import open_model

    t = time.perf_counter()
    graph = open_model(folder, provider="cpu", verify=False).graph("vae_decoder")
    created = time.perf_counter() - t
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 64), np.float32)
    return timed_calls(lambda: graph(latent_sample=latents)["sample"], repeats) | {"session_s": created}


def build_vae(src: Path, work: Path, profile, progress) -> dict:
    """{variant: folder}: the fp32 decoder as exported and the static int8 one (with its gate's check)."""
    static, gate = static_variant(src, work / "static-vae", "vae_decoder", profile, progress)
    return {"folders": {"fp32": src, "int8 static (QDQ Conv+MatMul)": static}, "gate": gate}


def run(args) -> dict:
    """Build the variants, then time each graph and compare each image to fp32's."""
    from sdexport.profiles import load_profile
    from runtime.metrics import max_abs, psnr
    from sdexport.quantize import int8_settings

    from .cpuinfo import cpu_info
    from .oneshot_report import _versions

    base = load_profile("cpu")
    s = dataclasses.replace(int8_settings(base), mode="static", steps=args.steps, size=args.size,
                            graphs=(args.graph,))
    prompts = list(s.calibration_prompts[:args.prompts])
    profile = dataclasses.replace(base, int8=dataclasses.asdict(s) | {"calibration_prompts": prompts,
                                                                      "graphs": [args.graph]})
    s = int8_settings(profile)
    vae = args.graph == "vae_decoder"
    built = (build_vae if vae else build)(args.cpu_folder, args.work, profile,
                                          lambda m: print(m, file=sys.stderr, flush=True))
    timed = decoder_time if vae else unet_time
    rows, ref = {}, {}
    for name, folder in built["folders"].items():
        print(f"timing {name}", file=sys.stderr, flush=True)
        t = timed(folder, args.repeats)
        img = image(folder, s)
        ref = ref or {"out": t["output"], "image": img}
        rows[name] = {"call_s": t["call_s"], "first_call_s": t["first_s"], "session_s": t["session_s"],
                      "output_vs_fp32": diff(t["output"], ref["out"]),
                      "image_psnr_db": _finite(psnr(ref["image"], img, 1.0)), "image_max_abs": max_abs(ref["image"], img)}
    fp32 = rows["fp32"]["call_s"]
    for r in rows.values():
        r["speedup_vs_fp32"] = fp32 / r["call_s"]
    return {"cpu": cpu_info(), "versions": _versions(), "graph": args.graph,
            "inputs": "1x4x64x64 latents" if vae else "batch 2, 4x64x64 latents, 77 tokens",
            "image": f"{s.size}x{s.size}, {s.steps} steps, guidance {s.guidance_scale}, seed {s.seed}, "
                     f"prompt {s.gate_prompt!r} (not a calibration prompt)",
            "calibration": {"prompts": prompts, "steps": s.steps, "size": s.size}, "gate": built["gate"],
            "variants": rows}


def main(argv=None) -> int:
    """Parse, run, print and write the JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__)
    p.add_argument("--cpu-folder", type=Path, required=True, help="a full-size fp32 cpu-target export")
    p.add_argument("--work", type=Path, default=Path("bench-int8-work"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=3, help="calibration prompts (of Int8Settings')")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--graph", choices=("unet", "vae_decoder"), default="unet")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.out = args.out or RESULTS / ("int8_vae.json" if args.graph == "vae_decoder" else "int8_static.json")
    result = run(args)
    for name, r in result["variants"].items():
        print(f"{name:32s} {r['call_s']:6.2f} s/call ({r['speedup_vs_fp32']:.2f}x)  {args.graph} max abs "
              f"{r['output_vs_fp32']['max_abs']:.3g}  image PSNR {r['image_psnr_db'] or float('inf'):.1f} dB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
