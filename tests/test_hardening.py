"""Bad input as a user would give it: one-line errors naming the problem, non-zero exits, no tracebacks
(unless --debug), and no change to existing files. Complements test_cli_export.py and test_runtime_cli.py."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.cli import main as runtime_main
from sdexport.cli import main as sdexport_main

ROOT = Path(__file__).resolve().parent.parent
PROPS = settings(max_examples=200, deadline=None, database=None)


# -- helpers ------------------------------------------------------------------------------------------

def rt(*args):
    """`runtime ARGS` in-process."""
    return CliRunner().invoke(runtime_main, [str(a) for a in args], catch_exceptions=False)


def sd(*args):
    """`sdexport ARGS` in-process."""
    return CliRunner().invoke(sdexport_main, [str(a) for a in args], catch_exceptions=False)


def gen_args(folder, out, *extra, prompt="a cat"):
    """A small, fast, valid generate command plus extra options (later options override earlier ones)."""
    return ["generate", "--model", folder, "--prompt", prompt, "--steps", "2", "--width", "64", "--height", "64",
            "--seed", "1", "--quiet", "--out", out, *extra]


def error_line(result, *words, code=2) -> str:
    """The exit code, exactly one `error:` line naming every word, and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    lines = [l for l in result.stderr.strip().splitlines() if l and not l.startswith(("[", "warning: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def ok(result):
    """Exit 0 and no traceback."""
    assert result.exit_code == 0, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    return result


def tree(folder: Path) -> dict:
    """Every file under folder with its SHA-256: to show a command changed nothing."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list:
    """Temporary or backup names the atomic writers use."""
    return [p.name for p in Path(folder).rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def model(tiny_export, tmp_path):
    """A private copy of the cpu export that a test may damage."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_export[0], dest)
    return dest


@pytest.fixture
def outdir(tmp_path):
    """An empty folder for outputs."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def edit_manifest(folder: Path, change) -> None:
    """Rewrite folder's sdexport.json: change(dict) edits it in place (returns None) or returns a replacement."""
    path = folder / "sdexport.json"
    data = json.loads(path.read_text())
    new = change(data)
    path.write_text(json.dumps(data if new is None else new))


def rerecord(folder: Path, rel: str) -> None:
    """Make the manifest's record of one file match what is on disk."""
    from runtime.manifest import file_record

    edit_manifest(folder, lambda m: m["files"].__setitem__(rel, file_record(folder / rel)))


# -- the model folder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("with_manifest", [True, False], ids=["sdexport", "optimum-layout"])
@pytest.mark.parametrize("rel", ["tokenizer/vocab.json", "scheduler/scheduler_config.json", "vae_decoder/model.onnx"])
def test_missing_file_in_model_folder(model, outdir, rel, with_manifest):
    if not with_manifest:
        (model / "sdexport.json").unlink()
    (model / rel).unlink()
    before = tree(model)
    error_line(rt(*gen_args(model, outdir / "x.png")), Path(rel).name)
    assert tree(model) == before and list(outdir.iterdir()) == []


def test_extra_unknown_files_are_fine(model, outdir):
    (model / "NOTES.txt").write_text("my notes")
    (model / "unet" / "backup.bin").write_bytes(b"\0" * 100)
    ok(rt(*gen_args(model, outdir / "x.png")))
    assert (outdir / "x.png").is_file()


def test_external_data_file_checked_by_size_and_hash(model, outdir):
    """A listed model.onnx_data: altered -> SHA-256 error (skipped by --no-verify); truncated -> size error always."""
    data = model / "unet" / "model.onnx_data"
    data.write_bytes(bytes(range(256)) * 64)
    rerecord(model, "unet/model.onnx_data")
    edit_manifest(model, lambda m: m["graphs"]["unet"].__setitem__("data_file", "unet/model.onnx_data"))
    out = outdir / "x.png"
    out.write_bytes(b"old")

    damaged = bytearray(data.read_bytes())
    damaged[1000] ^= 0xFF
    data.write_bytes(bytes(damaged))
    error_line(rt(*gen_args(model, out)), "model.onnx_data", "SHA-256")
    assert out.read_bytes() == b"old"
    ok(rt(*gen_args(model, out, "--no-verify")))          # same size: only the hash could tell
    assert out.read_bytes() != b"old"

    out.write_bytes(b"old")
    data.write_bytes(bytes(damaged[:2000]))
    for extra in ((), ("--no-verify",)):
        error_line(rt(*gen_args(model, out, *extra)), "model.onnx_data", "size", "truncated")
    assert out.read_bytes() == b"old" and not leftovers(outdir)


def test_wrong_hash_in_manifest(model, outdir):
    edit_manifest(model, lambda m: m["files"]["tokenizer/vocab.json"].__setitem__("sha256", "0" * 64))
    error_line(rt(*gen_args(model, outdir / "x.png")), "vocab.json", "SHA-256")
    ok(rt(*gen_args(model, outdir / "x.png", "--no-verify")))


@pytest.mark.parametrize("change,words", [
    (lambda m: m.__setitem__("format_version", 2), ("format version 2", "re-export")),
    (lambda m: m.__setitem__("format_version", "1"), ("format version '1'",)),
    (lambda m: m.__delitem__("files"), ("'files'",)),
    (lambda m: m.__delitem__("target"), ("'target'",)),
    (lambda m: m["graphs"]["unet"].__delitem__("outputs"), ("unet", "'outputs'")),
    (lambda m: m["graphs"]["unet"]["inputs"][0].__setitem__("dtype", "bfloat7"), ("bfloat7",)),
    (lambda m: m["shape_ranges"].__setitem__("height", [64, 512]), ("height", "[min, opt, max]")),
    (lambda m: [m], ("must be an object",)),
    (lambda m: {}, ("'format_version'",)),
], ids=["version-2", "version-str", "no-files", "no-target", "no-outputs", "bad-dtype", "bad-range", "list", "empty"])
def test_bad_manifest(model, outdir, change, words):
    edit_manifest(model, change)
    before = tree(model)
    error_line(rt(*gen_args(model, outdir / "x.png")), *words)
    error_line(rt("info", model), *words)
    assert tree(model) == before and list(outdir.iterdir()) == []


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"], ids=["syntax", "empty", "binary"])
def test_manifest_not_json(model, outdir, text):
    (model / "sdexport.json").write_bytes(text.encode("latin-1"))
    error_line(rt(*gen_args(model, outdir / "x.png")), "sdexport.json")


@pytest.mark.parametrize("key,value", [("shape_ranges", "big"), ("files", [1]), ("graphs", [])])
def test_manifest_value_of_wrong_type(model, outdir, key, value):
    edit_manifest(model, lambda m: m.__setitem__(key, value))
    error_line(rt(*gen_args(model, outdir / "x.png")), key)


def test_folder_exported_for_another_target(model, outdir):
    def to_cuda(m):
        m["target"] = "cuda"
        for g in m["graphs"].values():
            g["provider"], g["custom_ops"] = "CUDAExecutionProvider", ["com.microsoft.GroupNorm"]
    edit_manifest(model, to_cuda)
    before = tree(model)
    line = error_line(rt(*gen_args(model, outdir / "x.png")), "'cuda'", "CUDAExecutionProvider", "GroupNorm")
    assert "--target" in line or "--provider" in line
    assert tree(model) == before and list(outdir.iterdir()) == []
    assert "target      cuda" in ok(rt("info", model)).stdout

    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        error_line(rt(*gen_args(model, outdir / "x.png", "--provider", "cuda")), "CUDAExecutionProvider")
    error_line(rt(*gen_args(model, outdir / "x.png", "--provider", "tpu")), "tpu")


# -- prompts ------------------------------------------------------------------------------------------

def _parameters(png: Path) -> str:
    with Image.open(png) as im:
        return im.text["parameters"]


def test_empty_prompt_works(model, outdir):
    ok(rt(*gen_args(model, outdir / "x.png", "--negative-prompt", "", prompt="")))
    assert _parameters(outdir / "x.png").startswith("\nSteps: 2")


def test_huge_prompt_is_truncated_with_a_warning(model, outdir):
    r = ok(rt(*gen_args(model, outdir / "x.png", "--negative-prompt", "blurry " * 20000, prompt="a cat " * 20000)))
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 2 and all("truncated to 77 tokens" in w and len(w) < 400 for w in warnings), r.stderr
    assert (outdir / "x.png").is_file()


def test_control_characters_in_prompt(model, outdir):
    prompt = "a\x00cat\x1b[31m\r\n\t\x07\x7f\x85\u2028\u200b\ufeff"
    ok(rt(*gen_args(model, outdir / "x.png", "--negative-prompt", "\x00\x01", prompt=prompt)))
    assert _parameters(outdir / "x.png").startswith("a")


def test_lone_surrogate_prompt_in_process(model, outdir):
    r = ok(rt(*gen_args(model, outdir / "x.png", prompt="half a pair \ud83d here")))
    assert "warning: --prompt is not valid UTF-8" in r.stderr
    assert "\ufffd" in _parameters(outdir / "x.png")


def test_prompt_that_is_not_utf8_in_argv(tiny_export, outdir):
    """Raw Latin-1 bytes on the command line, as a non-UTF-8 terminal would pass them."""
    prompt = os.fsencode("caf\udce9 au lait \udcff")
    cmd = [sys.executable, "-m", "runtime", *gen_args(str(tiny_export[0]), str(outdir / "x.png"))]
    cmd[cmd.index("a cat")] = prompt
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300, env=os.environ | {"PYTHONPATH": str(ROOT)})
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "warning: --prompt is not valid UTF-8" in err
    assert _parameters(outdir / "x.png").startswith("caf\ufffd au lait \ufffd")


# -- numbers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,words", [
    (("--height", "100"), ("--height", "multiple of 8")),
    (("--height", "0"), ("--height",)),
    (("--height", "-64"), ("--height",)),
    (("--width", "63", "--height", "63"), ("--width", "multiple of 8")),
    (("--height", "32"), ("height 32", "range", "cpu")),
    (("--height", "8192"), ("height 8192", "range")),
    (("--steps", "-3"), ("steps",)),
    (("--guidance", "inf"), ("guidance",)),
    (("--guidance", "-inf"), ("guidance",)),
    (("--strength", "2"), ("strength",)),
    (("--threads", "x"), ("--threads",)),
], ids=lambda v: "_".join(v) if isinstance(v, tuple) else None)
def test_bad_numbers(model, outdir, extra, words):
    out = outdir / "x.png"
    out.write_bytes(b"old")
    r = rt(*gen_args(model, out, *extra))
    if extra[0] == "--threads":                 # click rejects it: usage error, exit 2, no traceback
        assert r.exit_code == 2 and "--threads" in r.stderr and "Traceback" not in r.output
    else:
        error_line(r, *words)
    assert out.read_bytes() == b"old" and sorted(p.name for p in outdir.iterdir()) == ["x.png"]


@pytest.mark.parametrize("strength", ["-0.1", "1.0001", "nan", "inf"])
def test_img2img_strength_outside_unit_interval(model, outdir, strength):
    Image.new("RGB", (64, 64), "gray").save(outdir / "init.png")
    error_line(rt(*gen_args(model, outdir / "x.png", "--init-image", outdir / "init.png", "--strength", strength)),
               "strength")
    assert not (outdir / "x.png").exists()


# -- init image and mask --------------------------------------------------------------------------------

@pytest.fixture
def images(outdir):
    """init.png (64x64), a truncated PNG, an empty file, a text file, a folder named like an image, a tiny image."""
    Image.new("RGB", (64, 64), "gray").save(outdir / "init.png")
    data = (outdir / "init.png").read_bytes()
    (outdir / "truncated.png").write_bytes(data[: len(data) // 2])
    (outdir / "empty.png").write_bytes(b"")
    (outdir / "text.png").write_text("hello")
    (outdir / "folder.png").mkdir()
    Image.new("RGB", (30, 30)).save(outdir / "tiny.png")
    return outdir


@pytest.mark.parametrize("flag,name,words", [
    ("--init-image", "truncated.png", ("--init-image", "truncated.png", "not a readable image")),
    ("--init-image", "empty.png", ("--init-image", "empty.png", "not a readable image")),
    ("--init-image", "folder.png", ("--init-image", "folder.png")),
    ("--init-image", "tiny.png", ("height 24", "range")),
    ("--mask", "missing.png", ("--mask", "missing.png", "does not exist")),
    ("--mask", "text.png", ("--mask", "text.png", "not a readable image")),
    ("--mask", "truncated.png", ("--mask", "truncated.png")),
])
def test_bad_init_image_or_mask(model, images, flag, name, words):
    extra = [flag, images / name] + (["--init-image", images / "init.png"] if flag == "--mask" else [])
    args = gen_args(model, images / "x.png", *extra)
    if name == "tiny.png":                       # no --width/--height: the size comes from the image (24x24)
        i = args.index("--width")
        del args[i:i + 4]
    before = tree(images)
    error_line(rt(*args), *words)
    assert tree(images) == before


def test_mask_without_init_image(model, images):
    error_line(rt(*gen_args(model, images / "x.png", "--mask", images / "init.png")), "--init-image")


# -- where the output goes -------------------------------------------------------------------------------

def test_out_is_an_existing_folder(model, outdir):
    (outdir / "x.png").mkdir()
    error_line(rt(*gen_args(model, outdir / "x.png")), "x.png", "folder")
    assert (outdir / "x.png").is_dir() and not leftovers(outdir)


def test_out_under_a_regular_file(model, outdir):
    (outdir / "file").write_text("keep")
    error_line(rt(*gen_args(model, outdir / "file" / "x.png")), "cannot write", "not a folder")
    assert (outdir / "file").read_text() == "keep"


def test_out_in_read_only_folder(model, outdir, monkeypatch):
    import runtime.atomic as atomic

    real = os.access
    monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == outdir.resolve() else real(p, mode))
    (outdir / "x.png").write_bytes(b"old")
    error_line(rt(*gen_args(model, outdir / "x.png")), "not writable", str(outdir.resolve()))
    assert (outdir / "x.png").read_bytes() == b"old" and not leftovers(outdir)


def test_convert_into_read_only_folder(tmp_path, monkeypatch):
    import runtime.atomic as atomic

    real = os.access
    monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == tmp_path.resolve() else real(p, mode))
    error_line(sd("convert", "--model", "tiny", "--out", tmp_path / "o", "--quiet"), "not writable")
    assert list(tmp_path.iterdir()) == []


def _disk_full(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("suffix", [".png", ".npy"])
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_disk_full_while_writing_output(model, outdir, monkeypatch, suffix, existing):
    out = outdir / f"x{suffix}"
    if existing:
        out.write_bytes(b"old")

    def partial_then_full(f):
        f.write(b"partial")
        _disk_full()

    if suffix == ".npy":
        monkeypatch.setattr("runtime.images.np.save", lambda f, arr, *a, **k: partial_then_full(f))
    else:
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: partial_then_full(fp))
    line = error_line(rt(*gen_args(model, out)), "disk full", out.name)
    assert ("existing file was kept" if existing else "nothing was written") in line
    assert (out.read_bytes() == b"old") if existing else not out.exists()
    assert not leftovers(outdir)


def _partial_export_then(fail):
    """A stand-in for one component's export that writes part of a graph, then fails."""
    def export(spec, components, folder, profile):
        (folder / spec.name).mkdir(parents=True)
        (folder / spec.name / "model.onnx").write_bytes(b"partial")
        fail()
    return export


def test_disk_full_during_convert_keeps_the_old_export(tmp_path, tiny_folder, monkeypatch):
    import sdexport.convert as conv

    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old export")

    monkeypatch.setattr(conv, "_export_one", _partial_export_then(_disk_full))
    line = error_line(sd("convert", "--model", "tiny", "--out", out, "--force", "--quiet"), "disk full", "o")
    assert "existing folder was kept" in line
    assert tree(out) == {"keep.txt": hashlib.sha256(b"old export").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# -- Ctrl-C -----------------------------------------------------------------------------------------------

def _interrupt(*a, **k):
    raise KeyboardInterrupt


def interrupted(result):
    assert result.exit_code == 130, (result.exit_code, result.output)
    assert "interrupted" in result.stderr and "Traceback" not in result.output


def test_ctrl_c_during_denoising(model, outdir, monkeypatch):
    from runtime.pipeline import StableDiffusionPipeline

    out = outdir / "x.png"
    out.write_bytes(b"old")
    monkeypatch.setattr(StableDiffusionPipeline, "unet", _interrupt)
    interrupted(rt(*gen_args(model, out)))
    assert out.read_bytes() == b"old" and sorted(p.name for p in outdir.iterdir()) == ["x.png"]


def test_ctrl_c_while_saving(model, outdir, monkeypatch):
    out = outdir / "x.png"
    out.write_bytes(b"old")

    def half_written(self, fp, *a, **k):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_written)
    interrupted(rt(*gen_args(model, out)))
    assert out.read_bytes() == b"old" and not leftovers(outdir)


def test_ctrl_c_during_convert_with_force_keeps_the_old_export(tmp_path, tiny_folder, monkeypatch):
    import sdexport.convert as conv

    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old export")

    monkeypatch.setattr(conv, "_export_one", _partial_export_then(_interrupt))
    interrupted(sd("convert", "--model", "tiny", "--out", out, "--force", "--quiet"))
    assert tree(out) == {"keep.txt": hashlib.sha256(b"old export").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# -- NaN / Inf --------------------------------------------------------------------------------------------

def poison(monkeypatch, graph: str, value=np.nan):
    """Make one graph's outputs NaN (or Inf), as an fp16 overflow would."""
    from runtime.session import Graph

    real = Graph.__call__

    def call(self, **feeds):
        outs = real(self, **feeds)
        return {k: np.full_like(v, value) for k, v in outs.items()} if self.name == graph else outs

    monkeypatch.setattr(Graph, "__call__", call)


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_from_the_unet(model, outdir, monkeypatch, value):
    out = outdir / "x.png"
    out.write_bytes(b"old")
    poison(monkeypatch, "unet", value)
    error_line(rt(*gen_args(model, out)), "NaN", "step 1", "fp16", "unet")
    assert out.read_bytes() == b"old" and sorted(p.name for p in outdir.iterdir()) == ["x.png"]


def test_nan_from_the_vae_decoder(model, outdir, monkeypatch):
    poison(monkeypatch, "vae_decoder")
    error_line(rt(*gen_args(model, outdir / "x.npy")), "NaN", "fp16", "vae_decoder", "fp32")
    assert list(outdir.iterdir()) == []


# -- internal errors and --debug -------------------------------------------------------------------------

def _boom(*a, **k):
    raise RuntimeError("boom happened\nsecond line of detail")


def test_internal_error_is_one_line_without_debug(model, outdir, monkeypatch):
    monkeypatch.setattr("runtime.pipeline.pipeline_for", _boom)
    line = error_line(rt(*gen_args(model, outdir / "x.png")), "RuntimeError", "boom happened", "--debug", code=1)
    assert "second line" not in line


@pytest.mark.parametrize("where", ["command", "group"])
def test_debug_shows_the_traceback(model, outdir, monkeypatch, where):
    monkeypatch.setattr("runtime.pipeline.pipeline_for", _boom)
    args = gen_args(model, outdir / "x.png")
    args = args + ["--debug"] if where == "command" else ["--debug", *args]
    r = rt(*args)
    assert r.exit_code == 1 and "Traceback" in r.stderr and "RuntimeError: boom happened" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: RuntimeError: boom happened")


def test_debug_does_not_turn_user_errors_into_tracebacks(model, outdir):
    error_line(rt(*gen_args(model, outdir / "x.png", "--steps", "0", "--debug")), "steps")


def test_sdexport_internal_error_and_debug(monkeypatch):
    import sdexport.profiles as profiles

    monkeypatch.setattr(profiles, "describe", _boom)
    error_line(sd("profiles"), "RuntimeError", "boom happened", code=1)
    r = sd("profiles", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.stderr


# -- convert: source folders with a missing file -----------------------------------------------------------

@pytest.mark.parametrize("rel", [
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
])
def test_convert_source_missing_file(tmp_path, tiny_folder, monkeypatch, rel):
    import sdexport.convert as conv

    src = tmp_path / "src"
    shutil.copytree(tiny_folder, src)
    (src / rel).unlink()

    def must_not_export(*a, **k):
        raise AssertionError(f"exported although {rel} is missing")

    monkeypatch.setattr(conv, "_export_one", must_not_export)
    error_line(sd("convert", "--model", src, "--out", tmp_path / "o", "--quiet"), Path(rel).name)
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


# -- properties -------------------------------------------------------------------------------------------

@PROPS
@given(st.text(max_size=40), st.integers(1, 8))
def test_seed_option_parses_or_fails_in_one_line(text, count):
    from runtime.cli import _parse_seed
    from runtime.errors import UserError

    try:
        seed = _parse_seed(text, count)
    except UserError as e:
        assert "\n" not in str(e) and "--seed" in str(e)
        return
    assert isinstance(seed, int) or (isinstance(seed, list) and len(seed) == count)


@PROPS
@given(st.integers(-10, 10), st.integers(-5000, 5000), st.integers(-5000, 5000))
def test_shape_check_accepts_exactly_the_ranges(batch, height, width):
    from runtime.errors import ModelFolderError
    from runtime.manifest import Manifest

    ranges = {"batch": [1, 1, 4], "height": [64, 512, 2048], "width": [64, 512, 2048]}
    m = Manifest("cpu", "fp32", ranges, {}, {})
    inside = 1 <= batch <= 4 and 64 <= height <= 2048 and 64 <= width <= 2048
    try:
        m.check_shape(batch, height, width)
        assert inside
    except ModelFolderError as e:
        assert not inside and "outside this model's range" in str(e) and "'cpu'" in str(e)


@PROPS
@given(st.integers(1, 50), st.sampled_from([".png", ".npy", ".PNG"]))
def test_output_paths_are_distinct_siblings(count, suffix):
    from runtime.images import output_paths

    paths = output_paths(Path("/x/out" + suffix), count)
    assert len(set(paths)) == count and all(p.parent == Path("/x") and p.suffix == suffix for p in paths)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def manifest_dict(tiny_export):
    return json.loads((tiny_export[0] / "sdexport.json").read_text())


@settings(max_examples=200, deadline=None, database=None, phases=(Phase.generate,))   # no shrinking: it fails
@given(data=st.data())
def test_any_manifest_edit_is_accepted_or_a_folder_error(manifest_dict, data):
    """Replace one value anywhere in a real manifest: the result validates or raises ModelFolderError."""
    import copy

    from runtime.errors import ModelFolderError
    from runtime.manifest import manifest_from_dict

    d = copy.deepcopy(manifest_dict)
    node = d
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        if not isinstance(node[key], (dict, list)) or not node[key] or data.draw(st.booleans()):
            break
        node = node[key]
    node[key] = data.draw(JSON)
    try:
        manifest_from_dict(d)
    except ModelFolderError:
        pass
