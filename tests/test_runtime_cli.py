"""`runtime` CLI: torch-free generation, outputs, Optimum folders, and one-line errors on bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent
BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):
            raise ImportError(f'{name} is blocked: the runtime must not need it')
sys.meta_path.insert(0, _Block())
from runtime.cli import main
main()
"""


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_line(result, *words):
    """Exit 2, one error line naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def base_args(folder, out):
    return ["generate", "--model", folder, "--prompt", "a cat", "--steps", "3", "--width", "64", "--height", "64",
            "--seed", "1", "--quiet", "--out", out]


def test_generate_without_torch(tiny_export, tmp_path):
    out = tmp_path / "img.png"
    cmd = [sys.executable, "-c", BLOCK_TORCH, *base_args(str(tiny_export[0]), str(out))]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.size == (64, 64)
        params = im.text["parameters"]
    assert params.startswith("a cat\n") and "Steps: 3" in params and "Seed: 1" in params and "Size: 64x64" in params
    assert "Sampler: PLMS" in params


SERVE_MODULES = """
import importlib, pkgutil, runtime.serve
for m in pkgutil.iter_modules(runtime.serve.__path__):
    if m.name != 'ray':                      # the Ray extra's module: it imports Ray, not torch
        importlib.import_module(f'runtime.serve.{m.name}')
"""


def test_serve_without_torch(tiny_export):
    """The serving install stays torch-free: every serve module imports, a txt2img request is served, Ctrl-C exits."""
    import base64
    import io
    import re
    import signal
    import urllib.request

    script = BLOCK_TORCH.replace("from runtime.cli import main", SERVE_MODULES + "from runtime.cli import main")
    cmd = [sys.executable, "-c", script, "serve", "--model", str(tiny_export[0]), "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        port = next(int(m.group(1)) for line in proc.stderr
                    if (m := re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)))
        body = json.dumps({"prompt": "a cat", "steps": 3, "width": 64, "height": 64, "seed": 1}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        with Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))) as im:
            assert im.size == (64, 64) and im.text["parameters"].startswith("a cat\n")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "is blocked" not in proc.stderr.read()


def test_batch_gets_numbered_files_and_per_image_seeds(tiny_export, tmp_path):
    out = tmp_path / "b.png"
    args = base_args(tiny_export[0], out)
    args[args.index("--seed") + 1] = "11,12"
    r = run(*args, "--batch", "2")
    assert r.exit_code == 0, r.output
    seeds = []
    for i in (1, 2):
        with Image.open(tmp_path / f"b-{i}.png") as im:
            seeds.append(im.text["parameters"].split("Seed: ")[1].split(",")[0])
    assert seeds == ["11", "12"] and not out.exists()


def test_npy_output_matches_png(tiny_export, tmp_path):
    assert run(*base_args(tiny_export[0], tmp_path / "a.npy")).exit_code == 0
    assert run(*base_args(tiny_export[0], tmp_path / "a.png")).exit_code == 0
    arr = np.load(tmp_path / "a.npy")
    assert arr.shape == (1, 64, 64, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    png = np.asarray(Image.open(tmp_path / "a.png"))
    assert np.array_equal((arr[0] * 255).round().astype(np.uint8), png)


def test_loads_optimum_layout(tiny_export, tmp_path):
    """A folder as Optimum's exporter writes it: no sdexport.json, same I/O names."""
    src = tmp_path / "optimum"
    shutil.copytree(tiny_export[0], src)
    (src / "sdexport.json").unlink()
    index = json.loads((src / "model_index.json").read_text())
    index["_class_name"] = "ORTStableDiffusionPipeline"
    (src / "model_index.json").write_text(json.dumps(index))
    assert run(*base_args(src, tmp_path / "o.npy")).exit_code == 0
    assert run(*base_args(tiny_export[0], tmp_path / "s.npy")).exit_code == 0
    assert np.array_equal(np.load(tmp_path / "o.npy"), np.load(tmp_path / "s.npy"))
    r = run("info", src)
    assert r.exit_code == 0 and "without sdexport.json" in r.stdout


def test_info_and_schedulers(tiny_export):
    r = run("info", tiny_export[0])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == str(tiny_export[0])
    assert any(l.split()[:2] == ["target", "cpu"] for l in lines)
    for graph in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert any(l.split()[:2] == [graph, f"{graph}/model.onnx"] for l in lines), graph
    assert any(l.split()[:2] == ["in", "sample"] for l in lines)
    r = run("schedulers")
    assert r.exit_code == 0
    listed = [l.split()[0] for l in r.stdout.splitlines()]
    for name in ("ddim", "euler-a", "dpm++2m-karras", "unipc", "lcm"):
        assert name in listed


@pytest.mark.parametrize("change,words", [
    (("--width", "60"), ("--width", "multiple of 8")),
    (("--steps", "0"), ("steps",)),
    (("--steps", "1000000"), ("steps",)),
    (("--guidance", "nan"), ("guidance",)),
    (("--guidance", "-1"), ("guidance",)),
    (("--scheduler", "nope"), ("nope",)),
    (("--seed", "x"), ("--seed",)),
    (("--width", "4096"), ("width", "range")),
    (("--batch", "0"), ("--batch",)),
])
def test_bad_generate_arguments(tiny_export, tmp_path, change, words):
    args = base_args(tiny_export[0], tmp_path / "x.png")
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    error_line(run(*args), *words)
    assert list(tmp_path.iterdir()) == []


def test_bad_paths(tiny_export, tmp_path):
    folder = tiny_export[0]
    error_line(run(*base_args(tmp_path / "missing", tmp_path / "x.png")), "no such model folder")
    error_line(run(*base_args(folder, tmp_path / "nodir" / "x.png")), "does not exist")
    error_line(run(*base_args(folder, tmp_path / "x.jpg")), ".png or .npy")
    error_line(run(*base_args(folder, tmp_path / "x.png"), "--init-image", tmp_path / "none.png"), "--init-image")
    (tmp_path / "notimage.png").write_text("hello")
    error_line(run(*base_args(folder, tmp_path / "x.png"), "--init-image", tmp_path / "notimage.png"),
               "not a readable image")
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (32, 32)).save(tmp_path / "mask.png")
    error_line(run(*base_args(folder, tmp_path / "x.png"), "--init-image", tmp_path / "init.png",
                   "--mask", tmp_path / "mask.png"), "same size")
    error_line(run(*base_args(folder, tmp_path / "x.png"), "--init-image", tmp_path / "init.png",
                   "--strength", "1.5"), "strength")
    assert not (tmp_path / "x.png").exists()


def test_corrupted_graph_is_caught_before_a_session(tiny_export, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_export[0], src)
    unet = src / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    error_line(run(*base_args(src, tmp_path / "x.png")), "SHA-256")
    unet.write_bytes(bytes(data[: len(data) // 2]))
    error_line(run(*base_args(src, tmp_path / "x.png")), "truncated")


def test_existing_output_survives_a_failed_run(tiny_export, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"old")
    args = base_args(tiny_export[0], out)
    args[args.index("--steps") + 1] = "0"
    error_line(run(*args), "steps")
    assert out.read_bytes() == b"old"
