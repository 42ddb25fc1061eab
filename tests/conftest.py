"""Shared fixtures: the tiny model built once, its cpu export, and its exports for the other targets."""
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


@pytest.fixture(scope="session")
def tiny_targets(tiny_export, tmp_path_factory):
    """target -> the tiny model's export folder for it, converted once per run on first use (cpu: tiny_export).

    GPU targets skip the convert's PyTorch comparison: their optimised UNet/VAE graphs need GPU kernels, so the
    convert could only compare the raw traces here; tests check those graphs structurally instead. Read-only:
    copy a folder before changing it.
    """
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile

    folders = {"cpu": tiny_export[0]}

    def get(target: str) -> Path:
        if target not in folders:
            out = tmp_path_factory.mktemp("targets") / f"tiny-{target}"
            convert(ConvertConfig("tiny", load_profile(target), out, verify=False))
            folders[target] = out
        return folders[target]
    return get
