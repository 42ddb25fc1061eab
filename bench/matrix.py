"""Component matrix on CPU: text encoder, UNet and VAE decoder x fp32/bf16/int8 x torch/onnxruntime/OpenVINO.

`python -m bench.matrix --source DIFFUSERS_DIR --cpu-folder DIR [--openvino-folder DIR] [--int8-work DIR]`
times one call of each component (text encoder: 2 x 77 tokens; UNet: batch 2, 64x64 latents; VAE decoder: one
64x64 latent -> 512x512), each cell in a fresh process: load (session creation / compile) + first call, the median
of the calls after it, peak RSS, and the output's max abs difference from torch fp32 on the same inputs. Ratios
are against torch fp32 measured in the same run. Writes bench/results/matrix.json and matrix.md.

int8 cells: onnxruntime's dynamic MatMul quantisation (text encoder, UNet) built here; the static QDQ UNet
(Conv + MatMul, calibrated on pipeline activations) is read from `--int8-work` (`python -m bench.int8 --work`),
where OpenVINO runs it too (its quantised ops in int8, the rest at its own precision choice).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from .int8 import variant_folder
from .unet_variants import diff, inputs, timed_calls
from .watch import peak_rss_mb

RESULTS = Path(__file__).parent / "results"
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
OUTPUTS = {"text_encoder": "last_hidden_state", "unet": "out_sample", "vae_decoder": "sample"}
NO_ORT_BF16 = "onnxruntime's CPU provider has no bf16 kernels for these graphs' Conv/MatMul on x86"
NO_TORCH_INT8 = "diffusers has no CPU int8 path to compare with"
NO_VAE_INT8 = "not built: the VAE decoder is Conv-bound and would need its own calibration set"


def feeds(component: str, source: str) -> dict:
    """The same inputs for every engine (seeded), sized by the source model's configs."""
    if component == "unet":
        cross = json.loads((Path(source) / "unet" / "config.json").read_text())["cross_attention_dim"]
        x = inputs()
        return x | {"encoder_hidden_states": np.resize(x["encoder_hidden_states"], (2, 77, cross))}
    rng = np.random.default_rng(1)
    if component == "text_encoder":
        ids = rng.integers(1, 49406, (2, 77))
        ids[:, 0], ids[:, 20:] = 49406, 49407          # BOS, a short prompt, EOS padding as the tokenizer gives
        return {"input_ids": ids.astype(np.int64)}
    return {"latent_sample": rng.standard_normal((1, 4, 64, 64)).astype(np.float32) / 0.18215}


def torch_cell(source: str, component: str, precision: str, repeats: int) -> dict:
    """diffusers/transformers module of the diffusers folder, fp32 or under bf16 autocast."""
    import torch

    t0 = time.perf_counter()
    if component == "text_encoder":
        from transformers import CLIPTextModel
        m = CLIPTextModel.from_pretrained(Path(source) / "text_encoder").eval()
        call = lambda x: m(torch.from_numpy(x["input_ids"]))[0]          # noqa: E731
    elif component == "unet":
        from diffusers import UNet2DConditionModel
        m = UNet2DConditionModel.from_pretrained(Path(source) / "unet").eval()
        call = lambda x: m(*(torch.from_numpy(x[k]) for k in ("sample", "timestep", "encoder_hidden_states")),  # noqa: E731
                           return_dict=False)[0]
    else:
        from diffusers import AutoencoderKL
        m = AutoencoderKL.from_pretrained(Path(source) / "vae").eval()
        call = lambda x: m.decode(torch.from_numpy(x["latent_sample"]), return_dict=False)[0]   # noqa: E731
    load = time.perf_counter() - t0
    x = feeds(component, source)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return call(x).float().numpy()
    return {"load_s": load} | timed_calls(run, repeats)


def runtime_cell(source: str, folder: str, component: str, provider: str, precision: str | None,
                 repeats: int) -> dict:
    """Our runtime's graph wrapper on onnxruntime's CPU provider or the OpenVINO runtime."""
    from runtime.model import open_model

    t0 = time.perf_counter()
    graph = open_model(Path(folder), provider=provider, verify=False, precision=precision).graph(component)
    x = {k: graph.cast(k, v) for k, v in feeds(component, source).items()}
    graph(**x)                                           # session creation / compile happen on first use
    load = time.perf_counter() - t0
    out = timed_calls(lambda: graph(**x)[OUTPUTS[component]], repeats)
    chosen = getattr(graph.session, "precision", "")
    return {"load_s": load, "first_s": out["first_s"], "call_s": out["call_s"], "output": out["output"],
            "ran_as": chosen or None}


def cell(kind: str, args: tuple) -> dict:
    """One cell in this (fresh) process, with its peak RSS."""
    try:
        r = torch_cell(*args) if kind == "torch" else runtime_cell(*args)
    except Exception as e:  # a cell that cannot run is recorded with its reason, the others go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return r | {"peak_rss_gb": peak_rss_mb() / 1024}


def plan(a) -> list:
    """[(component, engine, precision, kind, args or a reason string)] for every cell of the matrix."""
    ov, src = str(a.openvino_folder or a.cpu_folder), str(a.source)
    rows = []
    for c in a.components:
        rows += [(c, "torch", "fp32", "torch", (src, c, "fp32", a.repeats)),
                 (c, "torch", "bf16", "torch", (src, c, "bf16", a.repeats)),
                 (c, "torch", "int8", None, NO_TORCH_INT8),
                 (c, "onnxruntime", "fp32", "rt", (src, str(a.cpu_folder), c, "cpu", None, a.repeats)),
                 (c, "onnxruntime", "bf16", None, NO_ORT_BF16),
                 (c, "openvino", "fp32", "rt", (src, ov, c, "openvino", "fp32", a.repeats)),
                 (c, "openvino", "bf16", "rt", (src, ov, c, "openvino", "bf16", a.repeats))]
        if c == "vae_decoder":
            rows += [(c, "onnxruntime", "int8", None, NO_VAE_INT8), (c, "openvino", "int8", None, NO_VAE_INT8)]
            continue
        dynamic = a.work / f"dynamic-{c}"
        rows.append((c, "onnxruntime", "int8 dynamic (MatMul)", "rt", (src, str(dynamic), c, "cpu", None, a.repeats)))
        static = (a.int8_work / "static") if a.int8_work else None
        if c == "unet" and static and (static / "unet" / "model.onnx").is_file():
            rows += [(c, "onnxruntime", "int8 static (QDQ)", "rt", (src, str(static), c, "cpu", None, a.repeats)),
                     (c, "openvino", "int8 static (QDQ)", "rt", (src, str(static), c, "openvino", None, a.repeats))]
        elif c == "unet":
            rows.append((c, "onnxruntime", "int8 static (QDQ)", None, "not built: pass --int8-work from bench.int8"))
    return rows


def build_dynamic(a) -> None:
    """Copies of the cpu folder whose text encoder / UNet have dynamically quantised MatMul weights."""
    from sdexport.quantize import quantize_dynamic_int8

    for c in a.components:
        dest = a.work / f"dynamic-{c}"
        if c != "vae_decoder" and not (dest / "done").is_file():
            print(f"dynamic int8 {c} ...", file=sys.stderr, flush=True)
            variant_folder(a.cpu_folder, dest, c)
            quantize_dynamic_int8(dest / c / "model.onnx")
            (dest / "done").write_text("")


def run(a) -> dict:
    """Every cell in its own process, then ratios and differences against torch fp32 per component."""
    from .cpuinfo import cpu_info
    from .oneshot_report import _versions

    build_dynamic(a)
    spawn = multiprocessing.get_context("spawn")
    cells, outputs = [], {}
    for component, engine, precision, kind, args in plan(a):
        row = {"component": component, "engine": engine, "precision": precision}
        if kind is None:
            cells.append(row | {"skipped": args})
            continue
        print(f"{component} {engine} {precision} ...", file=sys.stderr, flush=True)
        with spawn.Pool(1) as pool:
            r = pool.apply(cell, (kind, args))
        out = r.pop("output", None)
        if out is not None:
            outputs[(component, engine, precision)] = out
        cells.append(row | r)
    for row in cells:
        ref = outputs.get((row["component"], "torch", "fp32"))
        mine = outputs.get((row["component"], row["engine"], row["precision"]))
        base = next((r for r in cells if r["component"] == row["component"] and r["engine"] == "torch"
                     and r["precision"] == "fp32"), {})
        if "call_s" in row and "call_s" in base:
            row["vs_torch_fp32"] = base["call_s"] / row["call_s"]
        if ref is not None and mine is not None:
            bad = int(np.size(mine) - np.isfinite(mine).sum())
            row["diff_vs_torch_fp32"] = diff(mine, ref) if not bad else {"max_abs": None, "non_finite": bad}
    return {"cpu": cpu_info(), "versions": _versions(), "repeats": a.repeats, "threads": "all cores (default)",
            "inputs": {"text_encoder": "2 x 77 token ids", "unet": "batch 2, 4x64x64 latents, 77 tokens",
                       "vae_decoder": "1 x 4x64x64 latents -> 512x512"}, "cells": cells}


def markdown(doc: dict) -> str:
    """One table per run: every cell, ratios against torch fp32."""
    from .cpuinfo import describe

    lines = [f"# Component matrix on CPU\n\n{describe(doc['cpu'])}; OpenVINO capabilities: "
             f"{', '.join(doc['cpu']['openvino'] or ['not installed'])}. One call per component "
             f"({'; '.join(f'{k}: {v}' for k, v in doc['inputs'].items())}), median of {doc['repeats']} after "
             f"the first, each cell in a fresh process. Versions: "
             f"{', '.join(f'{k} {v}' for k, v in doc['versions'].items() if v)}.\n",
             "| component | engine | precision | ran as | load + first call | call (median) | vs torch fp32 | "
             "max abs vs torch fp32 | peak RSS |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["cells"]:
        head = f"| {r['component']} | {r['engine']} | {r['precision']} |"
        if "call_s" not in r:
            lines.append(f"{head} - | - | - | - | - | {r.get('skipped') or r.get('error')} |")
            continue
        d = r.get("diff_vs_torch_fp32")
        err = ("ref" if d is None or d["max_abs"] == 0 else f"{d['max_abs']:.3g}" if d["max_abs"] is not None
               else f"{d['non_finite']} non-finite values")
        first = r["load_s"] + r["first_s"]
        lines.append(f"{head} {r.get('ran_as') or r['precision']} | {first:.2f} s | {r['call_s']:.3f} s | "
                     f"{r.get('vs_torch_fp32', 0):.2f}x | {err} | {r['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Parse, run every cell, print the table, write matrix.json and matrix.md."""
    p = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True, help="the diffusers folder the exports came from")
    p.add_argument("--cpu-folder", type=Path, required=True, help="its --target cpu export")
    p.add_argument("--openvino-folder", type=Path, help="its --target openvino export (default: the cpu folder)")
    p.add_argument("--int8-work", type=Path, help="bench.int8's --work folder (its static QDQ UNet)")
    p.add_argument("--work", type=Path, default=Path("bench-matrix-work"), help="where dynamic int8 copies go")
    p.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for matrix.json and matrix.md")
    a = p.parse_args(argv)
    doc = run(a)
    text = markdown(doc)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "matrix.json").write_text(json.dumps(doc, indent=2) + "\n")
    (a.out / "matrix.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
