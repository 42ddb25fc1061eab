"""runtime.randn against torch.randn and diffusers' randn_tensor, bit for bit."""
import math

import numpy as np
import pytest

from runtime.randn import (BatchGenerator, NumpyGenerator, TorchGenerator,
                           make_generator)

torch = pytest.importorskip("torch")

SEEDS = [0, 1, 42, 2**32 + 5, 2**63, 2**64 - 1, -1]
SHAPES = [(1, 4, 64, 64), (2, 4, 8, 8), (1, 4, 96, 64), (4,), (15,), (16,), (17,),
          (1, 3), (33,), (1, 4, 9, 7), (1,), (), (0,), (31,)]

# Tensors of 16 or more elements go through torch's AVX2 Box-Muller kernel, which
# AVX-512 CPUs run too; the DEFAULT kernel's values depend on the C library.
AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _skip_unless_avx2(shape):
    """Skip a check of torch's vectorised kernel where torch does not run it."""
    if math.prod(shape) >= 16 and not AVX2:
        pytest.skip("torch does not run its AVX2 normal kernel on this machine")


def _torch_stream(seed, shapes):
    """Successive torch.randn draws from one CPU generator seeded with seed."""
    g = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).numpy() for s in shapes]


def _assert_identical(ours, theirs):
    """Same shape, dtype float32 and the very same values."""
    assert ours.shape == theirs.shape
    assert ours.dtype == np.float32
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_torch_generator_is_bit_exact(seed, shape):
    _skip_unless_avx2(shape)
    _assert_identical(TorchGenerator(seed).randn(shape), _torch_stream(seed, [shape])[0])


@pytest.mark.parametrize("shapes", [
    [(1, 4, 64, 64), (1, 4, 64, 64), (1, 4, 64, 64)],    # latents, then ancestral noise
    [(3,), (1, 4, 9, 7), (1,)],                           # cached sine sample survives
    [(17,), (5,), (2, 8)],
], ids=str)
def test_torch_generator_stream_continues(shapes):
    for shape in shapes:
        _skip_unless_avx2(shape)
    g = TorchGenerator(1234)
    for ours, theirs in zip([g.randn(s) for s in shapes], _torch_stream(1234, shapes)):
        _assert_identical(ours, theirs)


def test_int_shape_means_one_dimension():
    _assert_identical(TorchGenerator(3).randn(5), _torch_stream(3, [(5,)])[0])


def test_batch_generator_matches_diffusers_randn_tensor():
    _skip_unless_avx2((1, 4, 8, 8))
    from diffusers.utils.torch_utils import randn_tensor
    seeds, shape = [0, 7, 2**32 + 5], (3, 4, 8, 8)
    torch_gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    ours = make_generator(seeds, batch=3)
    assert isinstance(ours, BatchGenerator)
    for _ in range(2):
        theirs = randn_tensor(shape, generator=torch_gens, dtype=torch.float32).numpy()
        _assert_identical(ours.randn(shape), theirs)


def test_batch_generator_rejects_other_batch_sizes():
    with pytest.raises(ValueError, match="batch size 2"):
        BatchGenerator([TorchGenerator(0), TorchGenerator(1)]).randn((3, 4))


def test_single_seed_serves_the_whole_batch():
    _skip_unless_avx2((2, 4, 2, 2))
    g = make_generator(5, batch=2)
    assert isinstance(g, TorchGenerator)
    _assert_identical(g.randn((2, 4, 2, 2)), _torch_stream(5, [(2, 4, 2, 2)])[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=[1, 2, 3], batch=2), "3 seeds for a batch of 2"),
    (dict(seed=[]), "seed list is empty"),
    (dict(seed=2**64), "out of range"),
    (dict(seed=-(2**63) - 1), "out of range"),
    (dict(seed=1.5), "must be an integer"),
    (dict(seed="42"), "must be an integer"),
    (dict(seed=[0, None]), "must be an integer"),
    (dict(seed=0, kind="philox"), "unknown generator kind"),
    (dict(seed=0, batch=0), "batch size must be a positive integer"),
])
def test_make_generator_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_generator(**kwargs)


def test_numpy_generator_is_deterministic():
    a, b = NumpyGenerator(42), NumpyGenerator(42)
    first = a.randn((1, 4, 8, 8))
    assert first.dtype == np.float32 and first.shape == (1, 4, 8, 8)
    assert np.array_equal(first, b.randn((1, 4, 8, 8)))
    assert np.array_equal(a.randn(7), b.randn(7))
    assert not np.array_equal(first, NumpyGenerator(43).randn((1, 4, 8, 8)))
    expected = np.random.default_rng(42).standard_normal((1, 4, 8, 8), dtype=np.float32)
    assert np.array_equal(first, expected)


def test_make_generator_numpy_kind():
    g = make_generator([3, 4], batch=2, kind="numpy")
    rows = [NumpyGenerator(s).randn((1, 5)) for s in (3, 4)]
    assert np.array_equal(g.randn((2, 5)), np.concatenate(rows))
