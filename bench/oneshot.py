"""One-shot generate, process by process: fixed cost (imports, session creation, first call) and peak RSS per phase.

`python -m bench.oneshot --cpu-folder DIR [--openvino-folder DIR] [--diffusers DIR]` runs each variant in its own
process (diffusers fp32, our runtime keeping its sessions as a server does, the CLI's one-shot mode that releases
sessions once done, and the openvino provider), all from the same initial latents, and prints/writes the table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT, NEGATIVE = "a lighthouse at dusk, oil painting", "blurry"


def _peak_mb() -> float:
    """This process's peak RSS so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _latents(size: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)


def child_runtime(job: dict) -> dict:
    """Our runtime in this process: times and peak RSS after opening, encoding+denoising and decoding."""
    t0 = time.perf_counter()
    import runtime.model as model_module
    from runtime.pipeline import StableDiffusionPipeline
    out = {"import_s": time.perf_counter() - t0}
    created, cache_use, weights = {}, {}, {}
    make = model_module.make_session

    def timed_make(path, *args, **kwargs):
        t = time.perf_counter()
        session = make(path, *args, **kwargs)
        created[path.parent.name] = created.get(path.parent.name, 0.0) + time.perf_counter() - t
        cache_use[path.parent.name] = getattr(session, "graph_cache", None)      # hit / stored / off
        weights[path.parent.name] = getattr(session, "weights", None)            # OpenVINO: f32 / bf16 kept
        return session
    model_module.make_session = timed_make
    t = time.perf_counter()
    model = model_module.open_model(Path(job["folder"]), provider=job["provider"], one_shot=job["one_shot"],
                                    precision=job.get("precision"))
    pipe = StableDiffusionPipeline(model)
    out |= {"open_s": time.perf_counter() - t, "peak_open_mb": _peak_mb()}
    marks = []
    decode = pipe.decode

    def timed_decode(latents):
        marks.append(("denoised", time.perf_counter(), _peak_mb()))
        _compile_times(model, created)
        return decode(latents)
    pipe.decode = timed_decode
    t = time.perf_counter()
    image = pipe(PROMPT, negative_prompt=NEGATIVE, latents=_latents(job["size"]), height=job["size"],
                 width=job["size"], num_inference_steps=job["steps"], guidance_scale=7.5, output_type="np").images
    end = time.perf_counter()
    _compile_times(model, created)
    out |= {"call_s": end - t, "encode_denoise_s": marks[0][1] - t, "decode_s": end - marks[0][1],
            "peak_denoise_mb": marks[0][2], "peak_mb": _peak_mb(), "session_create_s": created,
            "graph_cache": cache_use, "weights": weights}
    return out | {"image": _save(image, job)}


def _compile_times(model, created: dict) -> None:
    """Add OpenVINO's compile time (at first use of a shape) to each graph's session creation time, once."""
    for name, graph in model._graphs.items():
        seconds = getattr(graph.session, "compile_s", 0.0)
        created[name] = created.get(name, 0.0) + seconds
        graph.session.compile_s = 0.0


def child_diffusers(job: dict) -> dict:
    """diffusers' StableDiffusionPipeline (fp32 or bf16 autocast) in this process, phases as child_runtime."""
    t0 = time.perf_counter()
    import torch
    from diffusers import StableDiffusionPipeline
    out = {"import_s": time.perf_counter() - t0}
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(job["folder"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out |= {"open_s": time.perf_counter() - t, "peak_open_mb": _peak_mb()}
    marks = []
    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):
        marks.append(("denoised", time.perf_counter(), _peak_mb()))
        return decode(*args, **kwargs)
    pipe.vae.decode = timed_decode
    bf16 = job.get("precision") == "bf16"
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        image = pipe(PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(_latents(job["size"])),
                     height=job["size"], width=job["size"], num_inference_steps=job["steps"], guidance_scale=7.5,
                     output_type="np").images
    end = time.perf_counter()
    out |= {"call_s": end - t, "encode_denoise_s": marks[0][1] - t, "decode_s": end - marks[0][1],
            "peak_denoise_mb": marks[0][2], "peak_mb": _peak_mb()}
    return out | {"image": _save(image.astype("float32"), job)}


def _save(image, job: dict) -> str:
    """Write the image for the comparison; its path."""
    import numpy as np

    path = Path(job["work"]) / f"{job['name']}.npy"
    np.save(path, image)
    return str(path)


def run_variant(name: str, job: dict, work: Path) -> dict:
    """One variant in a fresh interpreter; its measurements plus the whole process's wall time."""
    job = job | {"name": name, "work": str(work)}
    if job.get("graph_cache") == "cold":      # the engine's cache folder inside the model folder, emptied
        import shutil
        shutil.rmtree(Path(job["folder"]) / ("ov_cache" if job["provider"] == "openvino" else "ort_cache"),
                      ignore_errors=True)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "bench.oneshot", "--child", json.dumps(job)], capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        return {"name": name, "status": "failed", "reason": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return {"name": name, "status": "ok", "process_s": wall} | json.loads(r.stdout.strip().splitlines()[-1])


def variants(args) -> list[tuple[str, dict]]:
    """(name, job) for every variant the arguments allow."""
    base = {"size": args.size, "steps": args.steps}
    out = []
    if args.diffusers:
        out.append(("diffusers-torch", base | {"kind": "diffusers", "folder": str(args.diffusers)}))
    for name, one_shot in (("runtime-ort (sessions kept)", False), ("runtime-ort one-shot", True)):
        out.append((name, base | {"kind": "runtime", "folder": str(args.cpu_folder), "provider": "cpu",
                                  "one_shot": one_shot}))
    if args.graph_cache:         # the folder's optimised-graph cache emptied, then filled by the first process
        for name, state in (("runtime-ort one-shot, graph cache empty", "cold"),
                            ("runtime-ort one-shot, graph cache filled", "warm")):
            out.append((name, base | {"kind": "runtime", "folder": str(args.cpu_folder), "provider": "cpu",
                                      "one_shot": True, "graph_cache": state}))
    if args.openvino_folder:    # with --graph-cache: its cache (bf16 weights, CACHE_DIR blobs) emptied, then filled
        states = (("empty", "cold"), ("filled", "warm")) if args.graph_cache else ((None, None),)
        for label, state in states:
            out.append((f"runtime-openvino one-shot{f', cache {label}' if label else ''}",
                        base | {"kind": "runtime", "folder": str(args.openvino_folder), "provider": "openvino",
                                "one_shot": True, "graph_cache": state}))
    return out


def main(argv=None) -> int:
    """Parent: run the variants one after another; child (--child JOB): measure one."""
    p = argparse.ArgumentParser(prog="python -m bench.oneshot", description=__doc__)
    p.add_argument("--child")
    p.add_argument("--cpu-folder", type=Path)
    p.add_argument("--openvino-folder", type=Path)
    p.add_argument("--diffusers", type=Path, help="the same model as a diffusers folder (the reference)")
    p.add_argument("--graph-cache", action="store_true",
                   help="also time one-shot processes with the folder's optimised-graph cache empty, then filled "
                        "(the folder's profile must set session.graph_cache), and OpenVINO's cache likewise")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "oneshot.json")
    args = p.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps((child_diffusers if job["kind"] == "diffusers" else child_runtime)(job)))
        return 0
    import tempfile

    from .cpuinfo import cpu_info, describe
    from .oneshot_report import report

    with tempfile.TemporaryDirectory(prefix="bench-oneshot-") as work:
        runs = [run_variant(name, job, Path(work)) for name, job in variants(args)]
        result = report(runs, cpu_info(), args)
    print(describe(result["cpu"]))
    print(result["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
