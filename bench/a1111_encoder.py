"""Cost of A1111 prompt encoding vs plain (diffusers) encoding for a long prompt, against one UNet step.

python -m bench.a1111_encoder [--model EXPORTED_FOLDER] [--repeats N]   (default: the tiny model, exported here)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

PROMPT = "a tall lighthouse on a rocky coast, stormy sea, (golden light:1.2), " * 11   # about 150 tokens
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The SIMD flags of interest that /proc/cpuinfo lists for this CPU."""
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return []
    present = set(line.split(":", 1)[1].split())
    return [f for f in FLAGS if f in present]


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(folder: Path, repeats: int) -> dict:
    """Seconds for plain and a1111 encoding of PROMPT and for one batch-2 UNet step, and their ratios."""
    from runtime.conditioning import Conditioning, encode
    from runtime.pipeline import StableDiffusionPipeline

    warnings.simplefilter("ignore", UserWarning)            # plain mode warns that it truncates PROMPT
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    size = pipe.model.facts.default_size
    f = pipe.model.facts.vae_scale_factor

    def encoder(syntax: str):
        return lambda: encode(pipe.model, [PROMPT], "", 1, size, size, 7.5, syntax)

    cond: Conditioning = encoder("plain")()
    latents = np.zeros((2, pipe.model.facts.latent_channels, size // f, size // f), np.float32)
    constants = pipe.unet_constants(cond)
    plain, a1111 = best_of(encoder("plain"), repeats), best_of(encoder("a1111"), repeats)
    step = best_of(lambda: pipe.unet_passes(latents, 500.0, constants, None), repeats)
    return {"model": folder.name, "plain_encode_s": plain, "a1111_encode_s": a1111, "unet_step_s": step,
            "a1111_vs_plain": a1111 / plain, "a1111_extra_vs_unet_step": (a1111 - plain) / step}


def main() -> None:
    """Print one JSON line: the timings, ratios, CPU model and flags."""
    from bench.__main__ import _cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="An exported folder (default: tiny, exported now).")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            from sdexport.convert import ConvertConfig, convert
            from sdexport.profiles import load_profile

            folder = Path(tmp) / "tiny-cpu"
            convert(ConvertConfig("tiny", load_profile("cpu"), folder))
        result = measure(folder, args.repeats)
    print(json.dumps(result | {"cpu": _cpu_name(), "flags": cpu_flags()}))


if __name__ == "__main__":
    main()
