"""The factored layers' CuPy branch end to end, without a GPU: ``tests/cuda_emulator/as_cupy`` (an importable
``cupy`` made of NumPy and the CPU emulator) is installed as ``cupy`` for the test, so ``npconv.functional.lowrank``
and ``npconv.layers.lowrank`` take their GPU path (type dispatch, validation, ops_lowrank, the kernels) on
"device" arrays. Each result is compared with the same call on NumPy arrays (the CPU path, itself tested against
independent references in tests/functional and tests/layers) and with the dense conv of the rebuilt kernel.
"""
from __future__ import annotations

import numpy as np
import pytest
from cuda_emulator import install_as_cupy
from reference import conv2d_einsum

from npconv.functional import lowrank as FL
from npconv.kernels.cuda import loader, ops_lowrank
from npconv.layers.lowrank import LowRankConv2d, LowRankLinear, MonochromaticConv2d, SeparableConv2d

pytestmark = pytest.mark.cpuemu


@pytest.fixture
def cp(monkeypatch):
    """The emulated ``cupy``, installed as ``sys.modules["cupy"]`` and as npconv's CuPy for this test."""
    mod = install_as_cupy(monkeypatch)
    yield mod
    loader.clear_cache()
    ops_lowrank.clear_cache()


@pytest.fixture(params=[True, False], ids=["contiguous", "strided"])
def contiguous(request):
    return request.param


def to_dev(cp, a, contiguous=True):
    """A device copy of ``a``; not C-contiguous (every other element of a larger array) unless ``contiguous``."""
    if contiguous:
        return cp.asarray(a)
    big = cp.zeros(tuple(2 * n for n in a.shape), dtype=a.dtype)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = a
    assert isinstance(view, cp.ndarray) and not view.flags.c_contiguous
    return view


def check(cp, got, want, dtype, taps):
    assert isinstance(got, cp.ndarray), f"expected a device array, got {type(got).__name__}"
    assert got.dtype == dtype and got.shape == want.shape
    tol = (2e-5 if np.dtype(dtype) == np.float32 else 1e-12) * max(1.0, np.sqrt(taps))
    np.testing.assert_allclose(cp.asnumpy(got), want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


def mono_dense(T, a, S):
    Wd = np.zeros((S.shape[0], T.shape[1]) + S.shape[1:])
    for f in range(S.shape[0]):
        for c in range(T.shape[1]):
            Wd[f, c] = T[a[f], c] * np.asarray(S[f], np.float64)
    return Wd


def test_functional_monochromatic(cp, rng, dtype, contiguous):
    x = rng.standard_normal((2, 3, 15, 14)).astype(dtype)
    T = rng.standard_normal((4, 3)).astype(dtype)
    a = np.array([3, 0, 3, 3, 1, 3, 3, 3, 3, 3])            # colour 2 unused, colour 3 has 8 filters
    S = rng.standard_normal((10, 5, 5)).astype(dtype)
    b = rng.standard_normal(10).astype(dtype)
    kw = dict(stride=2, padding=(1, 2, 0, 1))
    got = FL.monochromatic_conv2d(to_dev(cp, x, contiguous), to_dev(cp, T, contiguous), a,
                                  to_dev(cp, S, contiguous), cp.asarray(b), **kw)
    cpu = FL.monochromatic_conv2d(x, T, a, S, b, **kw)
    check(cp, got, cpu, dtype, 75)
    check(cp, got, conv2d_einsum(x, mono_dense(T, a, S), b, stride=(2, 2), padding=(1, 2, 0, 1)), dtype, 75)
    # the assignment may also be given as a device array
    check(cp, FL.monochromatic_conv2d(cp.asarray(x), cp.asarray(T), cp.asarray(a), cp.asarray(S), None, **kw),
          cpu - b[None, :, None, None], dtype, 75)


def test_functional_lowrank_and_separable(cp, rng, dtype, contiguous):
    x = rng.standard_normal((2, 5, 11, 12)).astype(dtype)
    first = rng.standard_normal((4, 5, 3, 3)).astype(dtype)
    second = rng.standard_normal((9, 4, 1, 1)).astype(dtype)
    V = rng.standard_normal((3, 5, 3, 1)).astype(dtype)
    Hz = rng.standard_normal((9, 3, 1, 4)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype)
    xd = to_dev(cp, x, contiguous)
    lr = dict(stride=(1, 2), padding=1, dilation=(2, 1))
    check(cp, FL.lowrank_conv2d(xd, to_dev(cp, first, contiguous), cp.asarray(second), cp.asarray(b), **lr),
          FL.lowrank_conv2d(x, first, second, b, **lr), dtype, 180)
    sp = dict(stride=2, padding=(1, 0, 2, 1))
    check(cp, FL.separable_conv2d(xd, cp.asarray(V), to_dev(cp, Hz, contiguous), None, **sp),
          FL.separable_conv2d(x, V, Hz, None, **sp), dtype, 180)
    A, B = rng.standard_normal((7, 3)).astype(dtype), rng.standard_normal((3, 10)).astype(dtype)
    x2 = rng.standard_normal((4, 10)).astype(dtype)
    check(cp, FL.lowrank_linear(to_dev(cp, x2, contiguous), cp.asarray(A), cp.asarray(B), cp.asarray(b[:7])),
          FL.lowrank_linear(x2, A, B, b[:7]), dtype, 30)


def test_functional_validation_on_device(cp, rng):
    x = cp.asarray(rng.standard_normal((1, 3, 6, 6)))
    T, S = cp.asarray(rng.standard_normal((2, 3))), cp.asarray(rng.standard_normal((2, 3, 3)))
    with pytest.raises(ValueError, match="assignment must lie in"):
        FL.monochromatic_conv2d(x, T, np.array([0, 2]), S)
    with pytest.raises(ValueError, match="output height"):
        FL.monochromatic_conv2d(x, T, np.array([0, 1]), cp.asarray(rng.standard_normal((2, 9, 3))))
    with pytest.raises(TypeError, match="mix"):
        FL.monochromatic_conv2d(x, rng.standard_normal((2, 3)), np.array([0, 1]), S)
    with pytest.raises(TypeError, match="float32 or float64"):
        FL.separable_conv2d(x.astype(np.float16), cp.asarray(rng.standard_normal((2, 3, 3, 1))),
                            cp.asarray(rng.standard_normal((4, 2, 1, 3))))


def make_layers(rng):
    """One layer of each factored kind (float64 factors) and the input they take (1, 3, 13, 12)."""
    C, F = 3, 12
    return {
        "monochromatic": MonochromaticConv2d(rng.standard_normal((4, C)), rng.integers(0, 4, F),
                                             rng.standard_normal((F, 5, 5)), rng.standard_normal(F), stride=2,
                                             padding=1),
        "lowrank": LowRankConv2d(rng.standard_normal((5, C, 3, 3)), rng.standard_normal((F, 5)),
                                 rng.standard_normal(F), stride=1, padding=(1, 0, 2, 1)),
        "separable": SeparableConv2d(rng.standard_normal((4, C, 5, 1)), rng.standard_normal((F, 4, 1, 5)),
                                     None, stride=(2, 1), padding=2),
        "linear": LowRankLinear(rng.standard_normal((7, 4)), rng.standard_normal((4, C * 13 * 12)),
                                rng.standard_normal(7)),
    }


@pytest.mark.parametrize("kind", ["monochromatic", "lowrank", "separable", "linear"])
def test_layers_on_device(cp, rng, dtype, contiguous, kind):
    layer = make_layers(rng)[kind]
    x = rng.standard_normal((2, 3, 13, 12)).astype(dtype)
    want = layer(x)                                       # the CPU path, weights cast to x's dtype
    assert layer.to_gpu() is layer and layer.on_gpu
    got = layer(to_dev(cp, x, contiguous))
    check(cp, got, want, dtype, 300)
    if kind == "monochromatic":
        assert isinstance(layer.params["assignment"], np.ndarray) and not isinstance(
            layer.params["assignment"], cp.ndarray), "the assignment stays in host memory"
    with pytest.raises(TypeError, match="mix"):
        layer(x)                                          # NumPy input, device weights
    layer.to_cpu()
    assert not layer.on_gpu
    np.testing.assert_array_equal(layer(x), want)
