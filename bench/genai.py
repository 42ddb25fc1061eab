"""OpenVINO's own Stable Diffusion pipelines on the same model, for comparison with our runtime's runs.

`python -m bench.genai --folder OV_DIR --ours bench/results/cpu-backends-25/results.json [--steps 25]` runs, each at
OpenVINO's own precision choice and at the f32 hint, each in its own process (pipeline load, first image, a second
image as steady, peak RSS):
- OpenVINO GenAI's torch-free C++ `Text2ImagePipeline`;
- optimum-intel's `OVStableDiffusionPipeline` (diffusers' pipeline in PyTorch around OpenVINO models), reshaped to
  the request's static shapes and compiled, as its documentation recommends for CPU.
Both read an optimum-intel export of the same diffusers folder (`optimum-cli export openvino --task text-to-image
--weight-format fp32`). They draw their own initial noise, so images are not compared; the ratios set their times
against the runs recorded in `--ours` (same model, size, steps, guidance). Needs `openvino-genai` and
`optimum-intel[openvino]` (not dependencies of this project); `--pipelines` picks which run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from .watch import peak_rss_mb

PROMPT, NEGATIVE = "a lighthouse at dusk, oil painting", "blurry"


def _genai(job: dict, config: dict):
    """GenAI's pipeline, loaded and compiled; a function making one image from a seed."""
    import openvino_genai

    pipe = openvino_genai.Text2ImagePipeline(job["folder"], "CPU", **config)
    return lambda seed: pipe.generate(PROMPT, negative_prompt=NEGATIVE, width=job["size"], height=job["size"],
                                      num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                                      rng_seed=seed)


def _optimum(job: dict, config: dict):
    """optimum-intel's pipeline, reshaped to the request's static shapes and compiled; as _genai."""
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(job["folder"], ov_config=config, compile=False)
    pipe.reshape(batch_size=1, height=job["size"], width=job["size"], num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    return lambda seed: pipe(PROMPT, negative_prompt=NEGATIVE, width=job["size"], height=job["size"],
                             num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                             generator=torch.Generator().manual_seed(seed), output_type="np")


PIPELINES = {"genai": _genai, "optimum": _optimum}


def child(job: dict) -> dict:
    """One pipeline in this process: load, first and second image."""
    t0 = time.perf_counter()
    config = {"INFERENCE_PRECISION_HINT": job["precision"]} if job["precision"] else {}
    generate = PIPELINES[job.get("pipeline", "genai")](job, config)
    load = time.perf_counter() - t0
    times = []
    for seed in (1, 2):
        t = time.perf_counter()
        generate(seed)
        times.append(time.perf_counter() - t)
    return {"load_s": load, "first_s": times[0], "steady_s": times[1], "peak_rss_gb": peak_rss_mb() / 1024}


def ours(path: Path) -> dict:
    """{backend/variant: run} of our recorded runs (bench's results.json)."""
    doc = json.loads(path.read_text())
    return {f"{r['backend']}:{r['variant']}": r for r in doc["runs"] if r.get("status") == "ok"}


def main(argv=None) -> int:
    """Parent: one process per precision; child (--child JOB): measure."""
    p = argparse.ArgumentParser(prog="python -m bench.genai", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child")
    p.add_argument("--folder", type=Path)
    p.add_argument("--ours", type=Path, required=False)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--pipelines", default="genai,optimum", help="comma-separated: genai, optimum")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "genai.json")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    unknown = set(a.pipelines.split(",")) - set(PIPELINES)
    if unknown:
        p.error(f"--pipelines: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PIPELINES)})")
    from .cpuinfo import cpu_info, describe

    runs = {}
    precisions = (("default", ""), ("f32", "f32"))
    for pipeline, (label, precision) in itertools.product(a.pipelines.split(","), precisions):
        name = f"{pipeline} {label}"
        job = {"pipeline": pipeline, "folder": str(a.folder), "precision": precision, "size": a.size,
               "steps": a.steps, "guidance": a.guidance}
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "bench.genai", "--child", json.dumps(job)], capture_output=True,
                           text=True)
        runs[name] = (json.loads(r.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - t}
                      if r.returncode == 0 else {"error": (r.stderr.strip().splitlines() or ["?"])[-1]})
        print(name, runs[name], flush=True)
    mine = ours(a.ours) if a.ours else {}
    pairs = {name: "runtime-openvino:fp32" if name.endswith(" f32") else "runtime-openvino:default" for name in runs}
    for name, key in pairs.items():
        if key in mine and "steady_s" in runs[name]:
            m = mine[key]
            runs[name]["ours"] = {"backend": key, "steady_s": m["steady_s"],
                                  "load_first_s": m["session_create_s"] + m["first_run_s"]}
            runs[name]["ours_speedup_steady"] = runs[name]["steady_s"] / m["steady_s"]
            runs[name]["ours_speedup_load_first"] = ((runs[name]["load_s"] + runs[name]["first_s"])
                                                     / (m["session_create_s"] + m["first_run_s"]))
    for name in (n for n in runs if n.endswith(" f32") and "steady_s" in runs[n] and "runtime-ort:fp32" in mine):
        runs[name]["ours_onnxruntime_fp32_speedup_steady"] = (runs[name]["steady_s"]
                                                              / mine["runtime-ort:fp32"]["steady_s"])
    cpu = cpu_info()
    doc = {"cpu": cpu, "cpu_line": describe(cpu), "size": a.size, "steps": a.steps,
           "guidance": a.guidance, "ours_file": str(a.ours) if a.ours else None, "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
