"""`sdexport` CLI: bad input gives a one-line error, a non-zero exit, and leaves nothing behind."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from sdexport.cli import main


def run(*args):
    """Invoke the CLI in-process; returns the click Result."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result, *words):
    """Exit 2, exactly one error line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [l for l in result.stderr.strip().splitlines() if not l.startswith("[")]  # minus progress lines
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_unknown_alias(tmp_path):
    r = run("convert", "--model", "sd-v9", "--out", str(tmp_path / "o"))
    one_line_error(r, "sd-v9", "alias")
    assert not (tmp_path / "o").exists()


def test_missing_folder(tmp_path):
    r = run("convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    one_line_error(r, "nope")
    assert list(tmp_path.iterdir()) == []


def test_non_sd_folder(tmp_path):
    src = tmp_path / "notsd"
    src.mkdir()
    (src / "readme.txt").write_text("hi")
    one_line_error(run("convert", "--model", str(src), "--out", str(tmp_path / "o")), "model_index.json")
    (src / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["x", "y"]}))
    one_line_error(run("convert", "--model", str(src), "--out", str(tmp_path / "o")), "model_index.json lacks")
    assert not (tmp_path / "o").exists()


def test_unknown_target(tmp_path):
    one_line_error(run("convert", "--model", "tiny", "--target", "tpu", "--out", str(tmp_path / "o")), "tpu")


def test_bad_shapes_option(tmp_path):
    one_line_error(run("convert", "--model", "tiny", "--shapes", "512by512", "--out", str(tmp_path / "o")),
                   "--shapes")


def test_existing_out_needs_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(run("convert", "--model", "tiny", "--out", str(out)), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("make_parent", ["missing", "file"])
def test_unwritable_out(tmp_path, make_parent):
    parent = tmp_path / "p"
    if make_parent == "file":
        parent.write_text("not a folder")
    r = run("convert", "--model", "tiny", "--out", str(parent / "o"))
    one_line_error(r, "cannot write")


def test_failure_leaves_nothing_and_force_keeps_old(tmp_path, tiny_folder, monkeypatch):
    import sdexport.convert as conv

    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old export")

    def broken_export(*a, **k):
        raise conv.UserError("simulated failure while exporting")

    monkeypatch.setattr(conv, "_export_one", broken_export)
    one_line_error(run("convert", "--model", "tiny", "--out", str(out), "--force"), "simulated")
    assert (out / "keep.txt").read_text() == "old export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_interrupt_leaves_nothing(tmp_path, tiny_folder, monkeypatch):
    import sdexport.convert as conv

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_export_one", interrupted)
    r = run("convert", "--model", "tiny", "--out", str(tmp_path / "o"))
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_refuses_checkpoint_with_missing_keys(tmp_path, tiny_folder):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "broken"
    shutil.copytree(tiny_folder, src)
    weights = src / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop(next(k for k in tensors if "final_layer_norm" in k))
    save_file(tensors, weights)
    one_line_error(run("convert", "--model", str(src), "--out", str(tmp_path / "o")), "text_encoder", "missing")
    assert not (tmp_path / "o").exists()


def test_verify_and_info_on_export(tiny_export):
    out, _ = tiny_export
    r = run("verify", str(out), "--model", "tiny")
    assert r.exit_code == 0, r.output
    assert "all 8 checks of 4 graphs match PyTorch" in r.stdout and r.stdout.count(" ok") == 8
    r = run("info", str(out))
    assert r.exit_code == 0 and "target      cpu" in r.stdout and "unet/model.onnx" in r.stdout


def test_verify_detects_a_different_model(tiny_export, tmp_path, tiny_folder):
    """A folder checked against other weights fails verification with a one-line error."""
    from safetensors.numpy import load_file, save_file

    out, _ = tiny_export
    src = tmp_path / "other"
    shutil.copytree(tiny_folder, src)
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("conv_out.weight"))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, weights)
    one_line_error(run("verify", str(out), "--model", str(src)), "unet")


def test_info_errors(tmp_path):
    one_line_error(run("info", str(tmp_path / "none")), "no such folder")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sdexport.json").write_text("{not json")
    one_line_error(run("info", str(tmp_path / "bad")), "sdexport.json")


def test_profiles_command():
    r = run("profiles")
    assert r.exit_code == 0
    for name in ("cpu", "cuda", "tensorrt", "directml"):
        assert f"{name}: " in r.stdout


def test_vae_override(tmp_path, tiny_folder):
    """--vae swaps in another VAE: its config ships with the graphs and verification runs against it."""
    from sdexport.tiny import tiny_folder as build

    other = build("tiny-sdxl") / "vae"
    out = tmp_path / "o"
    r = run("convert", "--model", "tiny", "--vae", str(other), "--out", str(out), "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "vae_decoder" / "config.json").read_text())["scaling_factor"] == 0.13025
    manifest = json.loads((out / "sdexport.json").read_text())
    assert manifest["source"]["overrides"]["vae"] == str(other.resolve())
    r = run("verify", str(out), "--model", "tiny", "--vae", str(other))
    assert r.exit_code == 0, r.output
    one_line_error(run("convert", "--model", "tiny", "--vae", str(tmp_path), "--out", str(tmp_path / "p")),
                   "--vae", "config.json")
