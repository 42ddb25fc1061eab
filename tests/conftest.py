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


@pytest.fixture(scope="session")
def family_export(tiny_export, tmp_path_factory):
    """name -> (diffusers folder, cpu export folder) of a built-in tiny family, converted (and verified) once per run.
    Read-only: copy a folder before changing it."""
    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile
    from sdexport.tiny import tiny_folder

    folders = {"tiny": (tiny_folder("tiny"), tiny_export[0])}

    def get(name: str) -> tuple:
        if name not in folders:
            out = tmp_path_factory.mktemp("families") / name
            convert(ConvertConfig(name, load_profile("cpu"), out))
            folders[name] = (tiny_folder(name), out)
        return folders[name]
    return get


SHIFTED_LAYERS = 4           # text encoder layers of the shifted model (the tiny one has 2): room for clip skip 2, 3


@pytest.fixture(scope="session")
def shifted_tiny(tiny_folder, tmp_path_factory):
    """(diffusers folder, cpu export folder): the tiny model with a 4-layer text encoder whose final LayerNorm bias
    is shifted. The random tiny encoder's states have a mean of about 1e-8, which makes A1111 emphasis' mean
    rescaling pure rounding noise; real CLIP states have a clear mean, which the shift gives here."""
    import shutil

    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    from sdexport.convert import ConvertConfig, convert
    from sdexport.profiles import load_profile
    from sdexport.tiny import prefix_text_model_keys

    folder = tmp_path_factory.mktemp("shifted") / "tiny"
    shutil.copytree(tiny_folder, folder)
    config = transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder")
    config.num_hidden_layers = SHIFTED_LAYERS
    torch.manual_seed(5)
    shutil.rmtree(folder / "text_encoder")
    transformers.CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    weights = folder / "text_encoder" / "model.safetensors"
    prefix_text_model_keys(weights)
    tensors = load_file(weights)
    (key,) = [k for k in tensors if k.endswith("final_layer_norm.bias")]
    tensors[key] = tensors[key] + np.linspace(0.1, 0.6, tensors[key].size, dtype=np.float32)
    save_file(tensors, weights)
    out = tmp_path_factory.mktemp("shifted-export") / "tiny-cpu"
    convert(ConvertConfig(str(folder), load_profile("cpu"), out, license="other", verify=False))  # parity: the tests
    return folder, out
