"""Run one benchmark configuration in its own process: export (cached), measure, compare with the reference."""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bench.watch import watch

PROMPT, NEGATIVE = "a lighthouse at dusk, oil painting", "blurry"
SEED = 0                  # of the noise stochastic schedulers draw after the shared initial latents


@dataclass(frozen=True)
class Spec:
    """One cell of the matrix; reason set means it is skipped."""
    backend: str
    model: str
    width: int
    height: int
    steps: int
    batch: int
    guidance: float = 7.5
    repeats: int = 2
    provider: str | None = "cpu"
    profile: str | None = None
    variant: str = "fp32"
    reference: bool = False
    reason: str | None = None

    @property
    def slug(self) -> str:
        """File-name-safe id of this run."""
        parts = [Path(self.model).name, self.backend, self.provider, self.profile, self.variant]
        return "-".join(p for p in parts if p)


# ---- parent side --------------------------------------------------------------------------


def _child(task: str, spec: Spec, work: Path, extra: dict) -> tuple[dict | None, float, str]:
    """Run `python -m bench.runner` for one task; (result or None, peak RSS MB, error text)."""
    job = work / f"{spec.slug}.{task}"
    job.with_suffix(".in.json").write_text(json.dumps({"task": task, "spec": asdict(spec)} | extra))
    cmd = [sys.executable, "-m", "bench.runner", "--one", str(job.with_suffix(".in.json")),
           "--result", str(job.with_suffix(".out.json"))]
    rc, peak, _, gpu = watch(cmd, job.with_suffix(".log"))
    if rc != 0:
        lines = job.with_suffix(".log").read_text(errors="replace").strip().splitlines()
        return None, peak, f"{task} exited with {rc}: {lines[-1] if lines else 'no output'}"
    return json.loads(job.with_suffix(".out.json").read_text()) | {"gpu_mem_mb": gpu}, peak, ""


def export_dir(spec: Spec) -> Path:
    """Cache folder of a model+profile+variant export."""
    from sdexport import __version__
    from sdexport.profiles import load_profile
    from sdexport.cache import cache_dir

    from .models import model_key

    variant = "int8" if spec.variant == "int8" else "fp32"      # OpenVINO's precision variants share one export
    key = f"{model_key(spec.model)}|{load_profile(spec.profile).hash}|{variant}|{__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "bench-exports" / f"{Path(spec.model).name}-{spec.profile}-{variant}-{digest}"


def execute(spec: Spec, work: Path, ref_image: Path | None) -> dict:
    """Measure one spec in subprocesses; returns Run fields (status, numbers, image path)."""
    if spec.reason:
        return {"status": "skipped", "reason": spec.reason}
    extra = {}
    if spec.backend.startswith("runtime-"):
        folder = export_dir(spec)
        if not (folder / "sdexport.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _, _, error = _child("export", spec, work, {"out": str(folder)})
            if error:
                return {"status": "failed", "reason": error}
        extra["folder"] = str(folder)
    result, peak, error = _child("measure", spec, work, extra | {"work": str(work)})
    if error:
        return {"status": "failed", "reason": error}
    out = {k: v for k, v in result.items() if k != "image"} | {"status": "ok", "peak_rss_mb": peak}
    out["image"] = result["image"]
    if ref_image is not None and not spec.reference:
        out["image_diff"] = image_diff(np.load(ref_image), np.load(result["image"]))
    return out


def image_diff(ref: np.ndarray, got: np.ndarray) -> dict:
    """Max abs difference and PSNR of two [0, 1] images."""
    from runtime.metrics import max_abs, psnr

    return {"max_abs": max_abs(ref, got), "psnr_db": psnr(ref, got, peak=1.0)}


# ---- child side ---------------------------------------------------------------------------


class Timers:
    """Wall-clock records of wrapped calls and step ends."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        self.calls, self.step_ends = {}, []

    def wrap(self, obj, attr: str, name: str) -> None:
        """Replace obj.attr by a version that records (start, duration) under name."""
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.calls.setdefault(name, []).append((t0, time.perf_counter() - t0))
            return out
        setattr(obj, attr, timed)

    def step_end(self, *_) -> None:
        """A pipeline step-end callback."""
        self.step_ends.append(time.perf_counter())

    def total(self, name: str) -> float:
        """Seconds spent in one wrapped call."""
        return sum(d for _, d in self.calls.get(name, []))

    def stages(self) -> dict:
        """Stage timings; overhead = denoising loop time outside UNet calls, per step."""
        unet = self.calls["unet"]
        loop = self.step_ends[-1] - unet[0][0]
        return {"text_encoder_s": self.total("text"), "unet_step_s": statistics.median(d for _, d in unet),
                "unet_total_s": self.total("unet"), "vae_decode_s": self.total("vae"),
                "scheduler_overhead_s": max(loop - self.total("unet"), 0.0) / len(self.step_ends)}


def initial_latents(spec: Spec, channels: int = 4, factor: int = 8) -> np.ndarray:
    """The initial noise every backend starts from."""
    shape = (spec.batch, channels, spec.height // factor, spec.width // factor)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def measure(make, spec: Spec, work: Path) -> dict:
    """Time creation, the first run and the steady repeats of a (pipe, timers, call) factory."""
    t0 = time.perf_counter()
    timers, call = make()
    created = time.perf_counter() - t0
    first, _ = _timed(call)
    steady = []
    for _ in range(max(spec.repeats, 1)):
        timers.reset()
        seconds, image = _timed(call)
        steady.append(seconds)
    path = work / f"{spec.slug}.npy"
    np.save(path, image)
    return {"session_create_s": created, "first_run_s": first, "steady_s": statistics.median(steady),
            "stages": timers.stages(), "image": str(path)}


def _timed(call) -> tuple[float, np.ndarray]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def diffusers_factory(spec: Spec, folder: Path):
    """(timers, call) for the folder's diffusers pipeline class with its pieces wrapped."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    timers = Timers()
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            timers.wrap(getattr(pipe, name), "forward", "text")
    timers.wrap(pipe.unet, "forward", "unet")
    timers.wrap(pipe.vae, "decode", "vae")
    latents = torch.from_numpy(initial_latents(spec))
    bf16 = spec.variant == "bf16"                  # diffusers-torch-bf16: the same pipeline under bf16 autocast
    # LCM pipelines take no negative prompt (guidance is an embedding, not CFG)
    negative = {"negative_prompt": [NEGATIVE] * spec.batch} if _accepts(pipe, "negative_prompt") else {}

    def on_step(_pipe, _i, _t, kwargs):
        timers.step_end()
        return kwargs

    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return pipe([PROMPT] * spec.batch, latents=latents, num_inference_steps=spec.steps,
                        guidance_scale=spec.guidance, height=spec.height, width=spec.width, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=on_step,
                        **negative).images
    return timers, call


def _accepts(pipe, argument: str) -> bool:
    """Whether a diffusers pipeline's call takes `argument`."""
    return argument in inspect.signature(pipe.__call__).parameters


def runtime_factory(spec: Spec, folder: Path):
    """(timers, call) for our runtime with its sessions created up front and its pieces wrapped."""
    from runtime.model import open_model
    from runtime.pipeline import StableDiffusionPipeline

    precision = spec.variant if spec.backend == "runtime-openvino" and spec.variant != "default" else None
    pipe = StableDiffusionPipeline(open_model(folder, provider=spec.provider, precision=precision))
    timers = Timers()
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        if pipe.model.has(name) and name.startswith("text_encoder"):
            timers.wrap(pipe.model.graph(name).session, "run", "text")
        elif pipe.model.has(name):
            pipe.model.graph(name)
    for attr, name in (("unet", "unet"), ("decode", "vae")):
        timers.wrap(pipe, attr, name)
    latents = initial_latents(spec)

    def call():
        return pipe([PROMPT] * spec.batch, negative_prompt=[NEGATIVE] * spec.batch, latents=latents,
                    num_inference_steps=spec.steps, guidance_scale=spec.guidance, height=spec.height,
                    width=spec.width, seed=SEED, output_type="np", callback=timers.step_end).images
    return timers, call


def export_task(spec: Spec, out: Path) -> dict:
    """Export the model with the spec's profile (int8: quantised UNet, judged by the image diff instead)."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    from .models import model_folder

    profile = load_profile(spec.profile)
    if spec.variant == "int8":
        profile = replace(profile, quantize_unet=True)
    t0 = time.perf_counter()
    convert(ConvertConfig(str(model_folder(spec.model)), profile, out, force=True, verify=spec.variant != "int8"))
    return {"export_s": time.perf_counter() - t0}


def run_task(job: dict) -> dict:
    """Do what one job file asks."""
    from .models import model_folder

    spec = Spec(**job["spec"])
    if spec.backend.startswith("runtime-") and job["task"] == "measure":   # no torch in this process
        import runtime.pipeline  # noqa: F401  (imports are not session creation time)

        make = lambda: runtime_factory(spec, Path(job["folder"]))  # noqa: E731
        return measure(make, spec, Path(job["work"]))
    from sdexport.cache import quiet_libraries

    quiet_libraries()
    if job["task"] == "export":
        return export_task(spec, Path(job["out"]))
    import diffusers  # noqa: F401

    folder = model_folder(spec.model)
    make = lambda: diffusers_factory(spec, folder)  # noqa: E731
    return measure(make, spec, Path(job["work"]))


def main(argv=None) -> int:
    """`python -m bench.runner --one JOB.json --result OUT.json`."""
    parser = argparse.ArgumentParser(prog="python -m bench.runner", description=__doc__)
    parser.add_argument("--one", required=True, type=Path, help="job file written by python -m bench")
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    args.result.write_text(json.dumps(run_task(json.loads(args.one.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
