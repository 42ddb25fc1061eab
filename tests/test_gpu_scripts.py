"""The GPU-run scripts: chunked payload round trip, checksum failures, and a CPU dry run of the timing script."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"


def _chunks():
    spec = importlib.util.spec_from_file_location("gpu_chunks", GPU / "chunks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _payload(tmp_path, size=300_000, chunk=64 * 1024):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(size)
    (src / "big.whl").write_bytes(data)
    (src / "small.whl").write_bytes(b"tiny wheel")
    manifest = _chunks().split(src, tmp_path / "payload", chunk)
    return data, manifest


def test_split_and_assemble_round_trip(tmp_path):
    data, manifest = _payload(tmp_path)
    assert all(sum((tmp_path / "payload" / s / n).stat().st_size for n in names) <= 64 * 1024
               for s, names in manifest["sets"].items())
    store, chunks = tmp_path / "store", _chunks()
    sets = sorted(p for p in (tmp_path / "payload").glob("set*") if p.is_dir())
    for k, folder in enumerate(sets):                  # one set per device call, as on the box
        carried = tmp_path / f"call{k}" / "payload"
        carried.mkdir(parents=True)
        (carried / folder.name).symlink_to(folder)
        status = chunks.assemble(carried, store)
        assert bool(status["missing"]) == (k < len(sets) - 1)
    assert (store / "files" / "big.whl").read_bytes() == data
    assert sorted(status["complete"]) == ["big.whl", "small.whl"] and not status["missing"]


def test_corrupted_chunk_is_caught_and_removed(tmp_path):
    _payload(tmp_path)
    chunks = _chunks()
    victim = next((tmp_path / "payload").glob("set02/big.whl.part*"))
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(chunks.ChunkError, match=victim.name):
        chunks.assemble(tmp_path / "payload", tmp_path / "store")
    assert not (tmp_path / "store" / "parts" / victim.name).exists()
    assert not (tmp_path / "store" / "files" / "big.whl").exists()


def test_reassemble_script_exit_codes(tmp_path):
    _payload(tmp_path)
    env = os.environ | {"DRY_RUN": "1", "OUT": str(tmp_path / "out")}
    script = tmp_path / "repo" / "bench" / "gpu"
    script.mkdir(parents=True)
    for name in ("chunks.py", "reassemble.sh"):
        (script / name).write_bytes((GPU / name).read_bytes())
    (script / "payload").symlink_to(tmp_path / "payload")
    run = subprocess.run(["bash", str(script / "reassemble.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads((tmp_path / "out" / "reassemble.json").read_text())["missing"] == {}


@pytest.mark.slow
def test_time_gpu_dry_run_on_cpu(tmp_path):
    from sdexport.tiny import tiny_folder
    src = tiny_folder()
    folder = tmp_path / "tiny-cpu"
    subprocess.run([sys.executable, "-m", "sdexport", "convert", "--model", "tiny", "--target", "cpu",
                    "--out", str(folder), "--quiet", "--no-verify"], check=True, cwd=ROOT)
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, str(GPU / "time_gpu.py"), "--onnx", f"io_binding={folder}",
                    "--diffusers", str(src), "--provider", "cpu", "--device", "cpu", "--size", "64",
                    "--steps", "2", "--runs", "1", "--out", str(out)], check=True, cwd=ROOT)
    res = json.loads(out.read_text())
    assert set(res["timings"]) == {"io_binding", "diffusers"}
    assert res["timings"]["io_binding"]["steps"]["2"]["median_s"] > 0
    assert "2" in res["speedup_vs_diffusers"]["io_binding"]
