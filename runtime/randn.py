"""Seeded Gaussian noise for the diffusion pipeline, in NumPy only.

`TorchGenerator` reproduces, bit for bit, what `torch.randn(shape, generator=g)`
returns for a CPU `g = torch.Generator("cpu").manual_seed(seed)`, call after
call, so a seed gives the same image as the PyTorch pipeline. `NumpyGenerator`
is a plain NumPy alternative. `BatchGenerator` gives every image of a batch its
own generator, as diffusers' `randn_tensor` does with a list of generators.

PyTorch sources matched (ATen, torch 2.13):
  aten/src/ATen/core/MT19937RNGEngine.h             mt19937 seeding and output
  aten/src/ATen/CPUGeneratorImpl.cpp                random(), random64(), normal cache
  aten/src/ATen/core/TransformationHelper.h         uniform_real
  aten/src/ATen/core/DistributionsHelper.h          uniform_real_distribution,
                                                    normal_distribution<double>
  aten/src/ATen/native/cpu/DistributionTemplates.h  normal_kernel, normal_fill,
                                                    NormalFill16 (AVX2)
  aten/src/ATen/native/cpu/avx_mathfun.h            log256_ps, sincos256_ps

Which kernel torch runs: x86-64 CPUs with AVX2 run the AVX2 Box-Muller
reproduced here, and so do CPUs with AVX-512 (torch's dispatch falls back to the
AVX2 normal kernel; checked against ATEN_CPU_CAPABILITY=avx2). The DEFAULT
kernel (CPUs without AVX2, ATEN_CPU_CAPABILITY=default, aarch64 such as Apple
silicon) does the same Box-Muller one element at a time with the C library's
logf/cosf/sinf, so its values depend on the libm. On glibc 2.36 about 38% of
its elements differ from the AVX2 ones, by a few ULP (at most 2.3e-6 in
absolute value). That kernel is not reproduced here. Tensors with fewer than 16
elements take torch's double-precision path, which is the same on every kernel;
here it calls the platform libm too (through `math`).
"""
from __future__ import annotations

import math
import operator
from typing import Sequence, Union

import numpy as np

from .errors import UserError

Shape = Union[int, Sequence[int]]

_SEED_LOW, _SEED_HIGH = -(2**63), 2**64    # what torch's manual_seed accepts
_MT_N = 624

_F = np.float32
_ZERO, _HALF, _ONE, _MINUS_TWO = _F(0.0), _F(0.5), _F(1.0), _F(-2.0)
_TWO_PI = _F(2.0 * math.pi)
_UNIFORM24 = _F(2.0**-24)

_MIN_NORM_POS = np.array(0x00800000, np.int32).view(np.float32)
_INV_MANT_MASK = ~0x7F800000
_HALF_BITS = 0x3F000000
_SQRTHF = _F(0.707106781186547524)
_LOG_P = [_F(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1,
                          -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
                          2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
_LOG_Q1, _LOG_Q2 = _F(-2.12194440e-4), _F(0.693359375)

_FOPI = _F(1.27323954473516)    # 4 / pi
_MINUS_DP = [_F(c) for c in (-0.78515625, -2.4187564849853515625e-4,
                             -3.77489497744594108e-8)]
_SINCOF = [_F(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COSCOF = [_F(c) for c in (2.443315711809948e-005, -1.388731625493765e-003,
                           4.166664568298827e-002)]


class SeedError(UserError, ValueError):
    """A seed, seed list or batch size that cannot be used."""


def _check_seed(seed) -> int:
    """CPUGeneratorImpl::set_current_seed's domain: an int in [-2**63, 2**64), wrapped to uint64."""
    if isinstance(seed, bool):
        raise SeedError(f"seed must be an integer, got {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        raise SeedError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})") from None
    if not _SEED_LOW <= value < _SEED_HIGH:
        raise SeedError(f"seed {value} is out of range: it must be in [-2**63, 2**64)")
    return value % _SEED_HIGH


def _check_shape(shape: Shape) -> tuple:
    """A tensor shape as a tuple of non-negative ints (an int n means (n,))."""
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    dims = tuple(operator.index(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape {dims} has a negative dimension")
    return dims


def _mt19937_key(seed: int) -> np.ndarray:
    """mt19937_engine::init_with_uint32: the state from the low 32 bits of the seed."""
    key = [seed & 0xFFFFFFFF]
    for j in range(1, _MT_N):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


def _fma(a, b, c) -> np.ndarray:
    """Fused multiply-add of float32 values, rounded once (vfmadd*ps)."""
    product = np.multiply(a, b, dtype=np.float64)    # exact: 24 + 24 bits < 53
    addend = np.asarray(c, dtype=np.float64)
    total = product + addend
    virtual = total - product                        # TwoSum: total + error is exact
    error = (product - (total - virtual)) + (addend - virtual)
    # Round to odd, so that rounding to float32 afterwards is a single rounding.
    bits = total.view(np.int64)
    nudge = (error != 0) & ((bits & 1) == 0)
    bits = bits + nudge * np.where((error > 0) == (total > 0), 1, -1)
    return bits.view(np.float64).astype(np.float32)


def _polynomial(x: np.ndarray, coefficients) -> np.ndarray:
    """Horner's rule with each y*x + c contracted into one fma, as GCC compiles avx_mathfun.h."""
    y = np.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        y = _fma(y, x, c)
    return y


def _log256_ps(x: np.ndarray) -> np.ndarray:
    """log256_ps: Cephes logf for positive float32 x."""
    bits = np.maximum(x, _MIN_NORM_POS).view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(np.float32) + _ONE
    x = ((bits & _INV_MANT_MASK) | _HALF_BITS).view(np.float32)    # mantissa in [0.5, 1)
    small = x < _SQRTHF
    e = e - small.astype(np.float32)
    x = (x - _ONE) + np.where(small, x, _ZERO)
    z = x * x
    y = _fma(_polynomial(x, _LOG_P) * x, z, e * _LOG_Q1)
    y = y - z * _HALF
    return (x + y) + e * _LOG_Q2


def _sincos256_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps: Cephes sinf and cosf of float32 x sharing one range reduction."""
    magnitude = np.abs(x)
    j = (magnitude * _FOPI).astype(np.int32)
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    r = magnitude
    for dp in _MINUS_DP:                 # extended-precision x - j * pi / 4
        r = _fma(y, dp, r)
    z = r * r
    cos_poly = _fma(_polynomial(z, _COSCOF) * z, z, -(z * _HALF)) + _ONE
    sin_poly = _fma(_polynomial(z, _SINCOF) * z, r, r)
    first = (j & 2) == 0
    sin = np.where(first, sin_poly, cos_poly)
    cos = np.where(first, cos_poly, sin_poly)
    sin = np.where(np.signbit(x) ^ ((j & 4) != 0), -sin, sin)
    cos = np.where(((j - 2) & 4) == 0, -cos, cos)
    return sin, cos


def _normal_fill_16(u: np.ndarray) -> np.ndarray:
    """NormalFill16<float> (AVX2) on rows of 16 uniforms: 8 Box-Muller pairs per row."""
    radius = np.sqrt(_MINUS_TWO * _log256_ps(_ONE - u[:, :8]))
    sin, cos = _sincos256_ps(_TWO_PI * u[:, 8:])
    # fmadd(n, std=1, mean=0) is n, except that -0 becomes +0.
    return np.concatenate([radius * cos, radius * sin], axis=1) + _ZERO


def _normal_fill(uniform: np.ndarray, n: int) -> np.ndarray:
    """normal_fill: n >= 16 normals; a ragged end is the last 16 recomputed from 16 fresh draws."""
    full = n - n % 16
    if full == n:
        return _normal_fill_16(uniform.reshape(-1, 16)).reshape(-1)
    blocks = np.concatenate([uniform[:full], uniform[n:]]).reshape(-1, 16)
    normals = _normal_fill_16(blocks).reshape(-1)
    return np.concatenate([normals[:n - 16], normals[full:]])


class TorchGenerator:
    """A CPU torch.Generator after manual_seed(seed), drawing as torch.randn does."""

    def __init__(self, seed: int):
        self.seed = _check_seed(seed)
        self._mt = np.random.MT19937(0)
        self._mt.state = {"bit_generator": "MT19937",
                          "state": {"key": _mt19937_key(self.seed), "pos": _MT_N}}
        self._next_normal = None     # CPUGeneratorImpl::next_double_normal_sample_

    def randn(self, shape: Shape) -> np.ndarray:
        """torch.randn(shape, generator=self, dtype=torch.float32) on the CPU."""
        shape = _check_shape(shape)
        n = math.prod(shape)
        if n < 16:
            values = [self._normal_double() for _ in range(n)]
            return np.array(values, dtype=np.float32).reshape(shape)
        uniform = self._uniform_float(n + (16 if n % 16 else 0))
        return _normal_fill(uniform, n).reshape(shape)

    def _uniform_float(self, n: int) -> np.ndarray:
        """uniform_real_distribution<float>(0, 1): 24 low bits of random(), times 2**-24."""
        return (self._mt.random_raw(n) & 0xFFFFFF).astype(np.float32) * _UNIFORM24

    def _uniform_double(self) -> float:
        """uniform_real_distribution<double>(0, 1): 53 low bits of random64(), times 2**-53."""
        hi, lo = (int(v) for v in self._mt.random_raw(2))
        return (((hi << 32) | lo) & (2**53 - 1)) * 2.0**-53

    def _normal_double(self) -> float:
        """normal_distribution<double>(0, 1): Box-Muller, caching the sine sample."""
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value + 0.0
        u1 = self._uniform_double()
        u2 = self._uniform_double()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = radius * math.sin(theta)
        return radius * math.cos(theta) + 0.0


class NumpyGenerator:
    """Float32 standard normals from numpy.random.default_rng(seed); not torch-compatible."""

    def __init__(self, seed: int):
        self.seed = _check_seed(seed)
        self._rng = np.random.default_rng(self.seed)

    def randn(self, shape: Shape) -> np.ndarray:
        """Standard normal float32 array of the given shape."""
        return self._rng.standard_normal(_check_shape(shape), dtype=np.float32)


class BatchGenerator:
    """One generator per image, drawn as diffusers' randn_tensor does with a list of generators."""

    def __init__(self, generators):
        self.generators = list(generators)
        if not self.generators:
            raise ValueError("BatchGenerator needs at least one generator")

    def randn(self, shape: Shape) -> np.ndarray:
        """Concatenate g.randn((1, *shape[1:])) over the generators; shape[0] is the batch."""
        shape = _check_shape(shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"shape {shape} does not start with the batch size "
                             f"{len(self.generators)} (one generator per image)")
        return np.concatenate([g.randn((1, *shape[1:])) for g in self.generators], axis=0)


_KINDS = {"torch": TorchGenerator, "numpy": NumpyGenerator}


def make_generator(seed, batch: int | None = None, kind: str = "torch"):
    """The noise source for a run: one seed for the whole batch, or a list of per-image seeds."""
    if kind not in _KINDS:
        raise SeedError(f"unknown generator kind {kind!r}; expected one of {sorted(_KINDS)}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, (int, np.integer))
                              or batch < 1):
        raise SeedError(f"batch size must be a positive integer, got {batch!r}")
    make = _KINDS[kind]
    if not isinstance(seed, (list, tuple)):
        return make(seed)
    if not seed:
        raise SeedError("the seed list is empty; give one seed per image")
    if batch is not None and len(seed) != batch:
        raise SeedError(f"got {len(seed)} seeds for a batch of {batch}; "
                        "give one seed per image, or a single seed")
    return BatchGenerator([make(s) for s in seed])
