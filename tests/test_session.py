"""Session layer: IO binding and per-shape pinned dimensions give the same images as plain sessions."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.pipeline import StableDiffusionPipeline


def generate(folder, **session):
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    pipe.model.session_config = dataclasses.replace(pipe.model.session_config, **session)
    out = pipe("a cat", num_inference_steps=3, seed=4, height=64, width=64, output_type="np").images
    return pipe, out


@pytest.fixture(scope="module")
def plain(tiny_export):
    return generate(tiny_export[0])[1]


def test_io_binding_matches_plain_run(tiny_export, plain):
    pipe, out = generate(tiny_export[0], io_binding=True)
    assert np.array_equal(out, plain)
    assert pipe.model.graph("unet").cfg.io_binding


def test_pinned_dimensions_build_one_session_per_shape(tiny_export, plain):
    pipe, out = generate(tiny_export[0], fixed_dims=True)
    np.testing.assert_allclose(out, plain, atol=1e-5)
    unet = pipe.model.graph("unet")
    pinned = [dict(k) for k in unet.sessions if k]
    assert pinned == [{"batch": 2, "latent_height": 8, "latent_width": 8, "sequence": 77}]
    pipe("a cat", num_inference_steps=2, seed=4, height=64, width=96, output_type="np")
    assert len([k for k in unet.sessions if k]) == 2


def test_on_device_checks_shapes(tiny_export):
    from runtime.errors import ModelFolderError

    pipe = StableDiffusionPipeline.from_pretrained(tiny_export[0], provider="cpu")
    with pytest.raises(ModelFolderError, match="encoder_hidden_states"):
        pipe.model.graph("unet").on_device("encoder_hidden_states", np.zeros((1, 77), np.float32))


def test_fixed_buffers_replay_in_place(tiny_export, plain):
    """The CUDA-graph mode: per shape, inputs are copied into the same buffers and outputs reuse theirs."""
    pipe, out = generate(tiny_export[0], io_binding=True, fixed_dims=True, fixed_buffers=True)
    np.testing.assert_allclose(out, plain, atol=1e-5)
    unet = pipe.model.graph("unet")
    (key,) = [k for k in unet.buffers]
    first = {n: id(v) for n, v in unet.buffers[key]["in"].items()}
    pipe("a dog", num_inference_steps=2, seed=9, height=64, width=64, output_type="np")
    assert {n: id(v) for n, v in unet.buffers[key]["in"].items()} == first
    again = pipe("a cat", num_inference_steps=3, seed=4, height=64, width=64, output_type="np").images
    np.testing.assert_allclose(again, plain, atol=1e-5)
