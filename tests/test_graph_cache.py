"""onnxruntime's optimised CPU graphs cached beside the folder: same images, reused, rebuilt when damaged."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from runtime import graph_cache
from runtime.model import open_model
from runtime.pipeline import StableDiffusionPipeline

CALL = dict(prompt="a lighthouse at dusk", num_inference_steps=2, seed=3, output_type="np")


@pytest.fixture
def folder(tiny_export, tmp_path):
    """A private copy of the cpu export (the cache is written into it)."""
    return shutil.copytree(tiny_export[0], tmp_path / "tiny-cpu", ignore=shutil.ignore_patterns("*_cache"))


def _run(folder):
    model = open_model(folder, provider="cpu")
    image = StableDiffusionPipeline(model)(**CALL).images
    return image, {n: model.graph(n).session.graph_cache for n in ("text_encoder", "unet", "vae_decoder")}


def test_first_session_stores_the_optimised_graph_and_later_ones_load_it(folder, tiny_export):
    assert open_model(folder, provider="cpu").session_config.graph_cache == "ort_cache"    # the cpu profile's
    first, how = _run(folder)
    assert set(how.values()) == {"stored"}
    entries = sorted(p.name for p in (folder / "ort_cache").iterdir())
    assert [e.split("-")[0] for e in entries if e.startswith("unet")] == ["unet"]
    assert all((folder / "ort_cache" / e / "done").is_file() for e in entries)
    assert not any(".tmp-" in e for e in entries)                 # no staging folder left behind
    again, how = _run(folder)
    assert set(how.values()) == {"hit"}
    assert np.abs(again - first).max() <= 1e-6


def test_a_damaged_entry_is_rebuilt(folder):
    first, _ = _run(folder)
    unet = next((folder / "ort_cache").glob("unet-*"))
    (unet / "model.onnx").write_bytes(b"not a graph")
    again, how = _run(folder)
    assert how["unet"] == "stored" and how["text_encoder"] == "hit"
    assert np.abs(again - first).max() <= 1e-6


def test_read_only_folder_caches_under_the_user_cache(folder, monkeypatch, tmp_path):
    monkeypatch.setenv("SDEXPORT_CACHE", str(tmp_path / "user"))
    monkeypatch.setattr(graph_cache.os, "access", lambda path, mode: False)
    where = graph_cache.cache_location(folder, "ort_cache", "onnxruntime")
    assert where.startswith(str(tmp_path / "user" / "onnxruntime" / "tiny-cpu-"))
    _, how = _run(folder)
    assert how["unet"] == "stored" and not (folder / "ort_cache").exists()


def test_key_follows_onnxruntime_version_and_pinned_dims(folder, monkeypatch):
    unet = folder / "unet" / "model.onnx"
    base = graph_cache.entry(unet, "ort_cache", "all", None)
    assert graph_cache.entry(unet, "ort_cache", "all", {"batch": 2}) != base
    assert graph_cache.entry(unet, "ort_cache", "disabled", None) is None        # nothing to save
    assert graph_cache.entry(unet, "", "all", None) is None                     # switched off
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.0")
    assert graph_cache.entry(unet, "ort_cache", "all", None) != base


def test_off_and_with_replaced_weights_nothing_is_written(folder):
    import onnx
    from onnx import numpy_helper

    from runtime.session import make_session

    cfg = open_model(folder, provider="cpu").session_config
    path = folder / "unet" / "model.onnx"
    init = next(i for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 1 and i.data_type == 1)
    merged = make_session(path, cfg, None, "cpu", initializers={init.name: numpy_helper.to_array(init)})
    assert merged.graph_cache == "off"                  # merged LoRA weights: the file's graph is not this one
    assert make_session(path, replace(cfg, graph_cache=""), None, "cpu").graph_cache == "off"
    assert not (folder / "ort_cache").exists()
