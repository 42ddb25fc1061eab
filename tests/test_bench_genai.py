"""bench.genai's parent: which pipelines run, and how their times are set against our recorded runs."""
from __future__ import annotations

import json
import subprocess

import pytest

from bench import genai


def test_unknown_pipeline_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        genai.main(["--folder", "x", "--pipelines", "genai,bogus"])
    assert e.value.code == 2 and "--pipelines: unknown bogus" in capsys.readouterr().err


def test_each_pipeline_runs_at_both_precisions_and_is_paired_with_ours(tmp_path, monkeypatch):
    ours = tmp_path / "results.json"
    ours.write_text(json.dumps({"runs": [
        {"backend": "runtime-openvino", "variant": "default", "status": "ok", "steady_s": 40.0,
         "session_create_s": 10.0, "first_run_s": 45.0},
        {"backend": "runtime-openvino", "variant": "fp32", "status": "ok", "steady_s": 170.0,
         "session_create_s": 6.0, "first_run_s": 171.0},
        {"backend": "runtime-ort", "variant": "fp32", "status": "ok", "steady_s": 160.0,
         "session_create_s": 2.0, "first_run_s": 175.0}]}))
    jobs, real_run = [], subprocess.run

    def fake_run(cmd, **kwargs):          # a child reporting fixed times for its pipeline and precision
        if "--child" not in cmd:
            return real_run(cmd, **kwargs)
        job = json.loads(cmd[cmd.index("--child") + 1])
        jobs.append((job["pipeline"], job["precision"]))
        steady = {"": 60.0, "f32": 200.0}[job["precision"]] * (1.5 if job["pipeline"] == "optimum" else 1.0)
        out = {"load_s": 5.0, "first_s": steady + 1, "steady_s": steady, "peak_rss_gb": 7.0}
        return subprocess.CompletedProcess(cmd, 0, json.dumps(out) + "\n", "")
    monkeypatch.setattr(genai.subprocess, "run", fake_run)
    out = tmp_path / "genai.json"
    assert genai.main(["--folder", "x", "--ours", str(ours), "--out", str(out)]) == 0
    assert jobs == [("genai", ""), ("genai", "f32"), ("optimum", ""), ("optimum", "f32")]
    runs = json.loads(out.read_text())["runs"]
    assert runs["genai default"]["ours_speedup_steady"] == pytest.approx(60 / 40)
    assert runs["optimum default"]["ours_speedup_steady"] == pytest.approx(90 / 40)
    assert runs["optimum default"]["ours_speedup_load_first"] == pytest.approx((5 + 91) / (10 + 45))
    assert runs["optimum f32"]["ours"]["backend"] == "runtime-openvino:fp32"
    assert runs["optimum f32"]["ours_onnxruntime_fp32_speedup_steady"] == pytest.approx(300 / 160)
