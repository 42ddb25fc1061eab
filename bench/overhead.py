"""Per-step overhead outside the UNet call (runtime vs diffusers) and the end-to-end speed-up, on one model."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .runner import Spec

TARGET_OVERHEAD, TARGET_SPEEDUP = 0.01, 1.3
RESULTS = Path(__file__).parent / "results"


def specs(model: str, size: int, steps: int, repeats: int) -> list[Spec]:
    """The diffusers reference and the runtime on the cpu profile, same shape."""
    shape = dict(model=model, width=size, height=size, steps=steps, batch=1, repeats=repeats)
    return [Spec(backend="diffusers-torch", reference=True, **shape),
            Spec(backend="runtime-ort", provider="cpu", profile="cpu", **shape)]


def summary(ref, ours) -> dict:
    """Overhead fractions, speed-up and the verdict against the targets."""
    frac = {name: run.stages.scheduler_overhead_s / run.stages.unet_step_s
            for name, run in (("runtime", ours), ("diffusers", ref))}
    speedup = ref.steady_s / ours.steady_s
    return {"model": ours.model, "size": ours.width, "steps": ours.steps,
            "runtime_overhead_per_step_s": ours.stages.scheduler_overhead_s,
            "diffusers_overhead_per_step_s": ref.stages.scheduler_overhead_s,
            "runtime_overhead_fraction": frac["runtime"], "diffusers_overhead_fraction": frac["diffusers"],
            "runtime_unet_step_s": ours.stages.unet_step_s, "diffusers_unet_step_s": ref.stages.unet_step_s,
            "runtime_steady_s": ours.steady_s, "diffusers_steady_s": ref.steady_s, "speedup": speedup,
            "overhead_ok": frac["runtime"] < TARGET_OVERHEAD, "speedup_ok": speedup >= TARGET_SPEEDUP,
            "image_max_abs": ours.image_diff and ours.image_diff.max_abs}


def main(argv=None) -> int:
    """Measure both backends in their own processes, print the comparison, write a JSON file."""
    from .__main__ import environment, run_all

    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    p.add_argument("--model", default="sd15-random")
    p.add_argument("--size", type=int, help="image size (default 512; 64 for tiny)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON result (default bench/results/overhead-MODEL.json)")
    args = p.parse_args(argv)
    size = args.size or (64 if args.model == "tiny" else 512)
    env = environment()
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as work:
        ref, ours = run_all(specs(args.model, size, args.steps, args.repeats), Path(work), env.machine_id)
    if "ok" != ref.status or "ok" != ours.status:
        print(f"error: {ref.reason or ours.reason}", file=sys.stderr)
        return 1
    result = summary(ref, ours) | {"environment": env.to_dict()}
    print(f"per-step overhead outside the UNet: runtime {100 * result['runtime_overhead_fraction']:.2f}% "
          f"(target < {100 * TARGET_OVERHEAD:.0f}%: {'ok' if result['overhead_ok'] else 'MISSED'}), "
          f"diffusers {100 * result['diffusers_overhead_fraction']:.2f}%; end-to-end speed-up "
          f"{result['speedup']:.2f}x (target >= {TARGET_SPEEDUP}x: {'ok' if result['speedup_ok'] else 'MISSED'})")
    out = args.out or RESULTS / f"overhead-{Path(args.model).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
