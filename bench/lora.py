"""What applying a LoRA at run time costs on an exported folder: merge, session build, cached switch, memory.

`python -m bench.lora --model DIR [--rank 16] [--out lora.json]` writes a random kohya LoRA (attention, MLP and
projection layers of the UNet and text encoder, shapes from the folder's weight maps), then times the steps of
runtime.lora against the plain model. The adapter alternative (onnxruntime LoRA adapters: rank-r branches in
the graph, fed per run) is priced by the extra multiply-adds those branches add to every call of the layers.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "proj", "ff.net.2", "proj_in", "proj_out", "q_proj", "k_proj",
          "v_proj", "out_proj", "fc1", "fc2")
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_lora(maps: dict, rank: int, path: Path, seed: int) -> int:
    """A kohya LoRA over the 2-D weights named like LoRA targets; returns its layer count."""
    from safetensors.numpy import save_file

    rng, out = np.random.default_rng(seed), {}
    for component, g in maps.items():
        for weight, entry in g.weights.items():
            module = weight[:-len(".weight")]
            if len(entry["shape"]) != 2 or not module.endswith(LINEAR) or component not in PREFIX:
                continue
            key = PREFIX[component] + module.replace(".", "_")
            o, i = entry["shape"]
            out[key + ".lora_down.weight"] = (rng.standard_normal((rank, i)) * 0.01).astype(np.float16)
            out[key + ".lora_up.weight"] = (rng.standard_normal((o, rank)) * 0.01).astype(np.float16)
            out[key + ".alpha"] = np.array(rank / 2, np.float16)
    save_file(out, str(path))
    return len(out) // 3


def adapter_overhead(maps: dict, rank: int) -> float:
    """Extra multiply-adds of rank-r adapter branches, relative to the targeted UNet layers' own (per token)."""
    base = extra = 0
    for weight, entry in maps["unet"].weights.items():
        if len(entry["shape"]) == 2 and weight[:-len(".weight")].endswith(LINEAR):
            o, i = entry["shape"]
            base, extra = base + o * i, extra + rank * (o + i)
    return extra / base


def merge_only(cache, path: Path) -> None:
    """Read one LoRA file and merge it into every component's initializers, without building sessions."""
    from runtime.lora.formats import load_lora
    from runtime.lora.keys import resolve
    from runtime.lora.merge import merged_initializers

    maps = cache.graph_weights()
    targets = resolve(load_lora(path), {c: g.names for c, g in maps.items()}, {c: g.shapes for c, g in maps.items()},
                      2)
    for c, g in maps.items():
        merged_initializers(g, [(t, 0.8) for t in targets if t.component == c])


def timed(fn):
    """(result, seconds)."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def unet_call(model, batch: int = 2, size: int = 64) -> float:
    """Seconds of one UNet call (batch, 4, size, size) on random inputs, first call excluded."""
    g = model.graph("unet")
    rng = np.random.default_rng(0)
    d = g.inputs["encoder_hidden_states"].shape[-1]
    feeds = {"sample": rng.standard_normal((batch, 4, size, size)).astype(np.float32),
             "timestep": g.cast("timestep", np.float32(500) if g.input_rank("timestep") == 0 else
                                np.full((batch,), 500, np.float32)),
             "encoder_hidden_states": rng.standard_normal((batch, 77, d)).astype(np.float32)}
    g(**feeds)
    return timed(lambda: g(**feeds))[1]


def run(folder: Path, rank: int, size: int) -> dict:
    """The measurements, as a dict."""
    from runtime.lora.apply import LoraCache
    from runtime.model import open_model

    model = open_model(folder, provider="cpu", verify=False)
    cache = LoraCache(model, max_sets=2)
    maps = cache.graph_weights()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    layers = random_lora(maps, rank, tmp / "a.safetensors", 0)
    random_lora(maps, rank, tmp / "b.safetensors", 1)
    r0 = rss_mb()
    _, base_build = timed(lambda: (model.graph("unet"), model.graph("text_encoder")))
    base_call = unet_call(model, size=size)
    r1 = rss_mb()
    _, merge_s = timed(lambda: merge_only(cache, tmp / "a.safetensors"))
    merged, apply_s = timed(lambda: cache.model_for(((tmp / "a.safetensors", 0.8),)))   # read, merge, build
    merged_call = unet_call(merged, size=size)
    r2 = rss_mb()
    _, cached = timed(lambda: cache.model_for(((tmp / "a.safetensors", 0.8),)))
    _, other_apply = timed(lambda: cache.model_for(((tmp / "b.safetensors", 0.8),)))
    return {"folder": str(folder), "rank": rank, "layers": layers,
            "base_session_build_s": round(base_build, 2), "lora_read_and_merge_s": round(merge_s, 2),
            "apply_one_lora_total_s": round(apply_s, 2), "lora_session_build_s": round(apply_s - merge_s, 2),
            "cached_switch_s": round(cached, 6), "second_lora_apply_s": round(other_apply, 2),
            "unet_call_base_s": round(base_call, 3), "unet_call_lora_s": round(merged_call, 3),
            "unet_call_latent": f"2x4x{size}x{size}",
            "peak_rss_base_mb": round(r1 - r0), "peak_rss_added_by_lora_mb": round(r2 - r1),
            "adapter_alternative_extra_macs": round(adapter_overhead(maps, rank), 4)}


def main(argv=None) -> None:
    """CLI entry: print (and optionally write) the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="latent size of the timed UNet call")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    result = run(a.model, a.rank, a.size)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
