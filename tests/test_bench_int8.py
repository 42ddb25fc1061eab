"""bench.int8 on the tiny export: the VAE decoder's static int8 variant is built, timed and compared with fp32."""
from __future__ import annotations

import json
import shutil


def test_vae_decoder_int8_bench_writes_times_and_the_gate(tiny_export, tmp_path):
    from bench import int8

    src = tmp_path / "cpu"
    shutil.copytree(tiny_export[0], src, ignore=shutil.ignore_patterns("ort_cache", "ov_cache"))
    out = tmp_path / "int8_vae.json"
    assert int8.main(["--cpu-folder", str(src), "--work", str(tmp_path / "work"), "--graph", "vae_decoder",
                      "--size", "64", "--steps", "2", "--prompts", "1", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["graph"] == "vae_decoder" and "flags" in json.dumps(doc["cpu"])
    rows = doc["variants"]
    assert set(rows) == {"fp32", "int8 static (QDQ Conv+MatMul)"}
    assert rows["fp32"]["speedup_vs_fp32"] == 1.0 and rows["fp32"]["image_psnr_db"] is None     # identical image
    int8_row = rows["int8 static (QDQ Conv+MatMul)"]
    assert int8_row["call_s"] > 0 and 0 < int8_row["output_vs_fp32"]["max_abs"] < float("inf")
    assert doc["gate"]["component"] == "vae_decoder" and doc["gate"]["installed"] == (doc["gate"]["psnr_db"] >= 30)
    assert (src / "vae_decoder" / "model.onnx").read_bytes() != (tmp_path / "work" / "static-vae" / "vae_decoder" /
                                                                 "model.onnx").read_bytes() or not doc["gate"]["installed"]
