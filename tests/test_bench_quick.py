"""The quick benchmark preset end to end on the tiny model, skipped backends, and the tiny family as models."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from bench import __main__ as bench_cli
from bench.schema import Results, read_json


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory, tiny_folder):
    """Output folder of `python -m bench --preset quick` (one steady repeat)."""
    out = tmp_path_factory.mktemp("bench-quick")
    assert bench_cli.main(["--preset", "quick", "--out", str(out), "--repeats", "1",
                           "--machine-id", "test-box"]) == 0
    return out


def test_quick_preset_writes_valid_results(quick_out):
    results = read_json(quick_out / "results.json")
    Results.from_dict(json.loads((quick_out / "results.json").read_text()))
    ok = {(r.backend, r.provider): r for r in results.runs if r.status == "ok"}
    assert set(ok) >= {("diffusers-torch", "cpu"), ("runtime-ort", "cpu")}
    ref, ours = ok[("diffusers-torch", "cpu")], ok[("runtime-ort", "cpu")]
    assert ref.reference and ref.image_diff is None
    assert ours.image_diff is not None and ours.image_diff.max_abs < 1e-2
    assert ours.stages.unet_total_s > 0 and ours.peak_rss_mb > 0 and ours.session_create_s > 0


def test_quick_preset_writes_report_and_charts(quick_out):
    report = (quick_out / "report.md").read_text()
    assert "speed-up" in report.splitlines()[next(i for i, l in enumerate(report.splitlines()) if "| machine" in l)]
    assert any(line.startswith("| test-box | runtime-ort") and line.rstrip(" |").endswith("x")
               for line in report.splitlines())
    pngs = sorted(p.name for p in quick_out.glob("*.png"))
    assert pngs and all((quick_out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_missing_backend_is_skipped_with_reason(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    preset = bench_cli.load_preset("quick") | {"backends": ["runtime-ort:cuda", "runtime-ort:tensorrt"]}
    specs = bench_cli.plan(preset)
    assert [s.profile for s in specs] == ["cuda", "tensorrt"]
    assert all("onnxruntime has no" in s.reason for s in specs)
    runs = [bench_cli.to_run(s, bench_cli.execute(s, None, None), "m") for s in specs]
    assert all(r.status == "skipped" and r.reason and r.provider in ("cuda", "tensorrt") for r in runs)


def test_tiny_family_models_are_planned():
    models = ["tiny-sdxl", "tiny-lcm", "tiny-sdxl-refiner", "no-such-model"]
    preset = bench_cli.load_preset("quick") | {"models": models, "backends": ["diffusers-torch"]}
    sdxl, lcm, refiner, unknown = bench_cli.plan(preset)
    assert sdxl.reason is None and lcm.reason is None
    assert "image-to-image" in refiner.reason
    assert unknown.reason.startswith("unknown model 'no-such-model'") and "tiny-sdxl," in unknown.reason


def test_diffusers_reference_runs_an_sdxl_model(tmp_path):
    """The reference loads the folder's own pipeline class (SDXL here) and times its text encoders."""
    from bench.runner import Spec, run_task

    spec = Spec(backend="diffusers-torch", model="tiny-sdxl", width=64, height=64, steps=2, batch=1, repeats=1,
                reference=True)
    result = run_task({"task": "measure", "spec": asdict(spec), "work": str(tmp_path)})
    assert np.load(result["image"]).shape == (1, 64, 64, 3)
    assert result["stages"]["text_encoder_s"] > 0 and result["steady_s"] > 0


def test_gpu_memory_is_summed_over_the_run_s_processes():
    from bench.watch import gpu_memory_mb

    table = "1234, 812\n99, 4000\n1240, 100\nbad line\n"
    assert gpu_memory_mb(table, {1234, 1240}) == 912.0
    assert gpu_memory_mb("", {1234}) == 0.0
