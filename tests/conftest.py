"""Shared fixtures: the tiny model built once, and one cpu export of it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Build built-in models into a per-run cache, not the user's."""
    os.environ.setdefault("SDEXPORT_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_folder(_isolated_cache) -> Path:
    """The tiny model as a diffusers folder."""
    from sdexport.tiny import tiny_folder as build

    return build()


@pytest.fixture(scope="session")
def tiny_components(tiny_folder):
    """The tiny model's loaded torch modules."""
    from sdexport.sources import load_components, resolve

    return load_components(resolve("tiny"))


@pytest.fixture(scope="session")
def tiny_export(tiny_folder, tmp_path_factory):
    """(folder, report) of `sdexport convert --model tiny --target cpu`."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    out = tmp_path_factory.mktemp("exports") / "tiny-cpu"
    report = convert(ConvertConfig("tiny", load_profile("cpu"), out))
    return out, report
