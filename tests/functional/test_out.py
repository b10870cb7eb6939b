"""``out=``: every functional op that produces an image-sized result writes it into a caller's array.

Each op is checked against an independent reference (einsum convolution of the rebuilt kernel, loop pooling,
the LRN formula), with ``out`` pre-filled with NaN so that an element left unwritten shows; the op must return
``out`` itself. Bad ``out`` arrays get a TypeError or ValueError that names ``out``.
"""
import numpy as np
import pytest

from npconv.functional import (avg_pool2d, conv2d, local_response_norm, lowrank_conv2d, max_pool2d,
                               monochromatic_conv2d, separable_conv2d)
from npconv.functional import bicluster as FB
from npconv.functional import conv as FC
from tests.functional.test_bicluster import _dense_kernel, _make
from tests.functional.test_lowrank import _mono_kernel
from tests.functional.test_normalization import ref_lrn
from tests.functional.test_pooling import ref_pool
from tests.reference import conv2d_einsum, tolerance

DTYPES = [np.float32, np.float64]


def _case(name, rng, dtype):
    """(x, call(x, out=...), reference output) for the op ``name``."""
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    x = r(3, 6, 11, 10)
    if name.startswith("conv2d"):
        variants = {  # (w shape, kwargs): im2col (one image per chunk and several), Winograd, 1x1, depthwise
            "conv2d-gemm": ((5, 6, 3, 3), dict(stride=2, padding=1)),
            "conv2d-winograd": ((4, 6, 3, 3), dict(padding=1, algorithm="winograd")),
            "conv2d-1x1": ((4, 6, 1, 1), {}),
            "conv2d-depthwise": ((6, 1, 3, 3), dict(padding=1, groups=6)),
            "conv2d-grouped": ((4, 3, 2, 3), dict(stride=(1, 2), padding=(0, 1, 2, 0), groups=2)),
        }
        wshape, kw = variants[name]
        w, b = r(*wshape), r(wshape[0])
        geo = {k: v for k, v in kw.items() if k != "algorithm"}
        st = geo.get("stride", 1)
        st = st if isinstance(st, tuple) else (st, st)
        p = geo.get("padding", 0)
        p = (p,) * 4 if isinstance(p, int) else p
        ref = conv2d_einsum(x, w, b, st, p, groups=geo.get("groups", 1))
        return x, lambda out: conv2d(x, w, b, out=out, **kw), ref
    if name == "max_pool2d":
        return x, lambda out: max_pool2d(x, 3, stride=2, ceil_mode=True, out=out), \
            ref_pool(x, (3, 3), (2, 2), (0, 0), True, "max")
    if name == "avg_pool2d":
        return x, lambda out: avg_pool2d(x, 3, stride=2, padding=1, out=out), \
            ref_pool(x, (3, 3), (2, 2), (1, 1), False, "avg")
    if name == "lrn":
        return x, lambda out: local_response_norm(x, size=5, out=out), ref_lrn(x, 5, 1e-4, 0.75, 2.0)
    if name == "lowrank_conv2d":
        first, second, b = r(3, 6, 3, 3), r(5, 3), r(5)
        wfull = np.einsum("ft,tcxy->fcxy", second.astype(np.float64), first.astype(np.float64))
        return x, lambda out: lowrank_conv2d(x, first, second, b, stride=2, padding=1, out=out), \
            conv2d_einsum(x, wfull, b, (2, 2), (1, 1, 1, 1))
    if name == "monochromatic_conv2d":
        xc = r(3, 3, 11, 10)
        T, S, b = r(2, 3), r(6, 5, 5), r(6)
        a = np.array([0, 1, 1, 0, 1, 0])
        return xc, lambda out: monochromatic_conv2d(xc, T, a, S, b, stride=2, padding=1, out=out), \
            conv2d_einsum(xc, _mono_kernel(T, a, S), b, (2, 2), (1, 1, 1, 1))
    if name == "separable_conv2d":
        v, h, b = r(4, 6, 3, 1), r(5, 4, 1, 3), r(5)
        wfull = np.einsum("fky,kcx->fcxy", h[:, :, 0].astype(np.float64), v[..., 0].astype(np.float64))
        return x, lambda out: separable_conv2d(x, v, h, b, stride=(2, 1), padding=1, out=out), \
            conv2d_einsum(x, wfull, b, (2, 1), (1, 1, 1, 1))
    kind = name.split("-")[1]
    f = _make(kind, rng, dtype)
    b = r(8)
    fn = {"cp": FB.bicluster_cp_conv2d, "svd": FB.bicluster_svd_conv2d, "shared": FB.shared_separable_conv2d}[kind]
    return x, lambda out: fn(x, *f, b, stride=2, padding=1, out=out), \
        conv2d_einsum(x, _dense_kernel(kind, f), b, (2, 2), (1, 1, 1, 1))


OPS = ["conv2d-gemm", "conv2d-winograd", "conv2d-1x1", "conv2d-depthwise", "conv2d-grouped", "max_pool2d",
       "avg_pool2d", "lrn", "lowrank_conv2d", "monochromatic_conv2d", "separable_conv2d", "bicluster-cp",
       "bicluster-svd", "bicluster-shared"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPS)
def test_writes_into_out(rng, name, dtype):
    x, call, ref = _case(name, rng, dtype)
    out = np.full(ref.shape, np.nan, dtype)
    got = call(out)
    assert got is out
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max())))
    # a second call into the same array overwrites it completely
    out[...] = np.nan
    assert call(out) is out
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max())))


def test_conv2d_out_with_image_chunks(rng, monkeypatch):
    """Several images per GEMM (the staging-buffer path) and a partial last chunk, into ``out``."""
    monkeypatch.setattr(FC, "_TARGET_COLUMNS", 2 * 30)
    x = rng.standard_normal((5, 3, 12, 12))
    w, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    out = np.full((5, 4, 5, 6), np.nan)
    assert conv2d(x, w, b, stride=2, padding=(0, 0, 0, 1), out=out) is out
    np.testing.assert_allclose(out, conv2d_einsum(x, w, b, (2, 2), (0, 0, 0, 1)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["conv2d-gemm", "max_pool2d", "lrn", "monochromatic_conv2d", "bicluster-cp"])
def test_bad_out(rng, name):
    x, call, ref = _case(name, rng, np.float32)
    with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
        call(ref.tolist())
    with pytest.raises(TypeError, match="out must have dtype float32"):
        call(np.empty(ref.shape, np.float64))
    bad = ref.shape[:-1] + (ref.shape[-1] + 1,)
    with pytest.raises(ValueError, match=r"out must have shape \(3, .*got \(3"):
        call(np.empty(bad, np.float32))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        call(np.empty(ref.shape[::-1], np.float32).T)
    ro = np.empty(ref.shape, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        call(ro)


def test_out_must_not_overlap_the_input(rng):
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="out must not overlap x"):
        local_response_norm(x, size=3, out=x)
    w = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    with pytest.raises(ValueError, match="out must not overlap x"):
        conv2d(x, w, out=x)
    big = np.empty(2 * 4 * 6 * 6 + 4 * 4, np.float32)
    with pytest.raises(ValueError, match="out must not overlap w"):
        conv2d(x, big[280:296].reshape(4, 4, 1, 1), out=big[:288].reshape(2, 4, 6, 6))


def test_run_validated_checks_out(rng):
    """The layers' entry point (factors validated at construction) still checks ``out``."""
    f = _make("cp", rng, np.float64)
    x = rng.standard_normal((2, 6, 9, 9))
    args = (f[0], f[1], *f[2:6], f[6], f[7])
    with pytest.raises(ValueError, match="out must have shape"):
        FB.run_validated("cp", x, args, None, (1, 1), (0, 0, 0, 0), 7, 6, out=np.empty((2, 8, 6, 6)))
    out = np.full((2, 8, 7, 6), np.nan)
    assert FB.run_validated("cp", x, args, None, (1, 1), (0, 0, 0, 0), 7, 6, out=out) is out
    np.testing.assert_allclose(out, conv2d_einsum(x, _dense_kernel("cp", f), None), rtol=1e-10, atol=1e-10)
