"""`python -m bench`: run a benchmark matrix from a preset and write results.json, report.md and charts."""
from __future__ import annotations

import argparse
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from bench.report import write_report
from bench.schema import Environment, ImageDiff, Results, Run, Stages

from .models import BUILDERS, skip_reason
from .runner import Spec, execute

PRESETS = Path(__file__).parent / "presets.toml"
BACKENDS = ("diffusers-torch", "runtime-ort", "runtime-openvino", "diffusers-torch-bf16")
PACKAGES = ("sdexport", "onnxruntime", "openvino", "torch", "diffusers", "transformers", "numpy")


def load_preset(name: str, config: Path = PRESETS) -> dict:
    """One preset table of a presets file."""
    presets = tomllib.loads(Path(config).read_text(encoding="utf-8"))
    if name not in presets:
        raise SystemExit(f"error: {config}: no preset {name!r} (have {', '.join(presets)})")
    return presets[name]


def plan(preset: dict) -> list[Spec]:
    """Every run of a preset: per model, the reference first, then each runtime profile and variant."""
    shape = {k: preset[k] for k in ("width", "height", "steps", "batch", "guidance", "repeats")}
    specs = []
    for model in preset["models"]:
        reason = skip_reason(model)
        for backend in preset["backends"]:
            for spec in backend_specs(backend, preset.get("variants", ["fp32"]), model, shape):
                specs.append(spec if spec.reason or not reason else replace(spec, reason=reason))
    return specs


def backend_specs(backend: str, variants: list, model: str, shape: dict) -> list[Spec]:
    """Specs of one backend entry: diffusers-torch[-bf16], runtime-ort[:PROFILE] or runtime-openvino[:PROFILE]."""
    name, _, only = backend.partition(":")
    if name not in BACKENDS:
        raise SystemExit(f"error: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if name == "diffusers-torch":
        return [Spec(backend=name, model=model, reference=True, **shape)]
    if name == "diffusers-torch-bf16":                          # bf16 autocast, compared with the fp32 reference
        return [Spec(backend=name, model=model, variant="bf16", provider=None, **shape)]
    if name == "runtime-openvino":
        return openvino_specs(only or "openvino", model, shape)
    from sdexport.profiles import profile_names

    return [spec for profile in ([only] if only else profile_names())
            for spec in profile_specs(profile, variants, model, shape)]


def profile_specs(name: str, variants: list, model: str, shape: dict) -> list[Spec]:
    """Runtime specs of one profile; skipped with a reason when this onnxruntime lacks its provider."""
    import onnxruntime as ort

    from runtime.session import PROVIDERS
    from sdexport.profiles import load_profile

    profile = load_profile(name)
    provider = next((k for k, v in PROVIDERS.items() if v == profile.provider), None)
    available = ort.get_available_providers()
    reason = None if profile.provider in available else (
        f"onnxruntime has no {profile.provider} (available: {', '.join(available)})")
    if provider == "openvino":
        reason = "the openvino profile runs on the runtime-openvino backend"
    cpu_only = profile.provider == "CPUExecutionProvider"
    return [Spec(backend="runtime-ort", model=model, provider=provider, profile=name, variant=v,
                 reason=reason, **shape) for v in variants if v == "fp32" or cpu_only]


def openvino_specs(profile: str, model: str, shape: dict) -> list[Spec]:
    """The openvino provider at OpenVINO's own precision choice and at the f32 hint (same export)."""
    from runtime.openvino_backend import available

    reason = None if available() else 'openvino is not installed (pip install "sdexport[openvino]")'
    return [Spec(backend="runtime-openvino", model=model, provider="openvino", profile=profile, variant=v,
                 reason=reason, **shape) for v in ("default", "fp32")]


def run_all(specs: list[Spec], work: Path, machine: str) -> list[Run]:
    """Execute specs in order, printing progress on stderr; the reference image feeds the diffs."""
    runs, ref_image = [], {}
    for i, spec in enumerate(specs, 1):
        if not spec.reason:
            print(f"[{i}/{len(specs)}] {spec.slug} ...", file=sys.stderr, flush=True)
        fields = execute(spec, work, ref_image.get(spec.model))
        if spec.reference and fields["status"] == "ok":
            ref_image[spec.model] = Path(fields["image"])
        runs.append(to_run(spec, fields, machine))
        took = f" steady {fields['steady_s']:.2f} s" if fields["status"] == "ok" else f": {fields['reason']}"
        print(f"[{i}/{len(specs)}] {spec.slug} {fields['status']}{took}", file=sys.stderr, flush=True)
    return runs


def to_run(spec: Spec, fields: dict, machine: str) -> Run:
    """A schema Run from a spec and what execute measured."""
    from sdexport.profiles import load_profile

    numbers = {k: fields.get(k) for k in ("session_create_s", "first_run_s", "steady_s", "peak_rss_mb")}
    stages, diff = fields.get("stages"), fields.get("image_diff")
    return Run(machine_id=machine, backend=spec.backend, provider=spec.provider, profile=spec.profile,
               profile_hash=spec.profile and "sha256:" + load_profile(spec.profile).hash,
               variant=spec.variant, model=spec.model, width=spec.width, height=spec.height, steps=spec.steps,
               batch=spec.batch, reference=spec.reference, status=fields["status"], reason=fields.get("reason"),
               stages=stages and Stages(**stages), image_diff=diff and ImageDiff(**diff), **numbers)


def environment(machine: str | None = None) -> Environment:
    """This machine: CPU, cores, RAM, GPU, OS and package versions."""
    import os

    import psutil

    from sdexport.convert import tool_versions

    versions = {k: v for k, v in tool_versions().items() if k in PACKAGES} | {"openvino": _version("openvino")}
    from .cpuinfo import cpu_info, describe

    return Environment(machine_id=machine or socket.gethostname(), cpu=describe(cpu_info()), cores=os.cpu_count(),
                       ram_gb=round(psutil.virtual_memory().total / 1e9, 1), gpu=_gpu_name(),
                       os=platform.platform(), python=platform.python_version(), versions=versions)


def _version(package: str) -> str | None:
    """An installed package's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str | None:
    """The CPU model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_name() -> str | None:
    """GPU names from nvidia-smi, or None."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return ", ".join(names) if out.returncode == 0 and names else None


def _parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--preset", default="quick", help="preset name in the config file (quick, standard)")
    p.add_argument("--config", type=Path, default=PRESETS, help="presets TOML file")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/PRESET)")
    p.add_argument("--models", help=f"comma-separated models: {', '.join(BUILDERS)} or diffusers folder paths")
    p.add_argument("--backends", help="comma-separated: diffusers-torch, diffusers-torch-bf16, runtime-ort, "
                   "runtime-ort:PROFILE, runtime-openvino")
    p.add_argument("--repeats", type=int, help="steady-state repeats per run")
    p.add_argument("--machine-id", help="machine id in the results (default: host name)")
    return p


def main(argv=None) -> int:
    """Run the preset and write the report."""
    args = _parser().parse_args(argv)
    preset = dict(load_preset(args.preset, args.config))
    for key in ("models", "backends"):
        if getattr(args, key):
            preset[key] = getattr(args, key).split(",")
    if args.repeats:
        preset["repeats"] = args.repeats
    env = environment(args.machine_id)
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        runs = run_all(plan(preset), Path(work), env.machine_id)
    results = Results(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), preset=args.preset,
                      environments=(env,), runs=tuple(runs))
    out = args.out or Path(__file__).parent / "results" / args.preset
    written = write_report(results, out)
    print(f"wrote {len(written)} files to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
