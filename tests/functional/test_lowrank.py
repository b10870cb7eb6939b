"""Factored layers executed as their factors: each equals the conv / linear with the rebuilt kernel."""
import numpy as np
import pytest

from npconv.functional import _direct as DR
from npconv.functional import lowrank as FL
from npconv.functional.lowrank import lowrank_conv2d, lowrank_linear, monochromatic_conv2d, separable_conv2d
from tests.reference import tolerance
from tests.reference import conv2d_einsum, conv2d_naive

DTYPES = [np.float32, np.float64]
# (N, C, H, W, X, Y, stride, padding)
GEOMS = [
    (2, 3, 11, 13, 3, 3, (1, 1), (1, 1, 1, 1)),
    (1, 3, 17, 15, 7, 7, (2, 2), (1, 1, 1, 1)),
    (3, 2, 9, 10, 5, 3, (2, 1), (2, 0, 1, 3)),
    (1, 4, 8, 8, 1, 1, (3, 3), (0, 0, 0, 0)),
    (2, 1, 6, 12, 2, 4, (1, 3), (0, 1, 2, 0)),
]


def check(got, ref, dtype):
    rtol, atol = tolerance(dtype)
    assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * scale)


def _mono_kernel(T, a, S):
    """W[f, c] = T[a_f, c] * S[f], by loops."""
    F, X, Y = S.shape
    W = np.zeros((F, T.shape[1], X, Y))
    for f in range(F):
        for c in range(T.shape[1]):
            W[f, c] = T[a[f], c] * S[f]
    return W


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("colors,unequal", [(2, False), (3, True), (6, True)])
@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "numba"])
def test_monochromatic(rng, monkeypatch, dtype, geom, colors, unequal, microkernel):
    monkeypatch.setattr(DR, "USE_MICROKERNEL", microkernel)
    monkeypatch.setattr(DR, "_MK_MIN_FILL", 0.0)       # the micro-kernel on sparse blocks too
    N, C, H, W, X, Y, st, pad = geom
    F = 12
    T = rng.standard_normal((colors, C)).astype(dtype)
    a = rng.integers(0, colors, F) if unequal else np.repeat(np.arange(colors), F // colors)
    S = rng.standard_normal((F, X, Y)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    ref = conv2d_einsum(x, _mono_kernel(T, a, S), b, st, pad)
    check(monochromatic_conv2d(x, T, a, S, b, stride=st, padding=pad), ref, dtype)
    check(monochromatic_conv2d(x, T, a, S, None, stride=st, padding=pad), ref - b[None, :, None, None], dtype)


@pytest.mark.parametrize("C", [5, 6, 7])
@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "numba"])
def test_monochromatic_more_input_channels(rng, monkeypatch, C, microkernel):
    """The colour planes sum the first 3 input channels in one pass, then one pass a further channel: 5, 6 and 7
    channels (the GEOMS above have 1 to 4)."""
    monkeypatch.setattr(DR, "USE_MICROKERNEL", microkernel)
    x = rng.standard_normal((2, C, 10, 11))
    T = rng.standard_normal((3, C))
    a = np.array([0, 1, 2, 2, 1, 0, 1, 2])
    S = rng.standard_normal((8, 3, 3))
    ref = conv2d_einsum(x, _mono_kernel(T, a, S), None, (2, 1), (1, 1, 0, 1))
    check(monochromatic_conv2d(x, T, a, S, stride=(2, 1), padding=(1, 1, 0, 1)), ref, np.float64)


@pytest.mark.parametrize("W", [9, 12])
@pytest.mark.parametrize("pl,pr", [(0, 0), (1, 2), (2, 1), (3, 3)])
def test_monochromatic_column_stride_2_paddings(rng, W, pl, pr):
    """Column stride 2 fills both column phases of a row in one pass (``_pack.split_row2``): every left padding
    parity, odd and even widths."""
    x = rng.standard_normal((2, 3, 8, W)).astype(np.float32)
    T = rng.standard_normal((3, 3)).astype(np.float32)
    a = np.array([0, 1, 2, 0, 1, 2])
    S = rng.standard_normal((6, 3, 5)).astype(np.float32)
    pad = (1, 0, pl, pr)
    ref = conv2d_naive(x, _mono_kernel(T, a, S), None, (1, 2), pad)
    check(monochromatic_conv2d(x, T, a, S, stride=(1, 2), padding=pad), ref, np.float32)


def test_monochromatic_empty_cluster_and_naive(rng):
    x = rng.standard_normal((2, 3, 7, 6))
    T = rng.standard_normal((5, 3))
    a = np.array([0, 0, 4, 4, 4])                   # colours 1-3 unused
    S = rng.standard_normal((5, 3, 2))
    ref = conv2d_naive(x, _mono_kernel(T, a, S), None, (2, 1), (1, 0, 0, 1))
    check(monochromatic_conv2d(x, T, a, S, stride=(2, 1), padding=(1, 0, 0, 1)), ref, np.float64)


def test_monochromatic_non_contiguous(rng):
    base = rng.standard_normal((2, 9, 3, 20)).astype(np.float32)
    x = base.transpose(0, 2, 1, 3)[:, :, :, ::2]     # (2, 3, 9, 10), neither C- nor F-contiguous
    assert not x.flags.c_contiguous
    T = rng.standard_normal((4, 3)).astype(np.float32)[:, ::-1]
    S = rng.standard_normal((8, 3, 3)).astype(np.float32)[::-1]
    a = np.repeat(np.arange(4), 2)
    ref = conv2d_einsum(x, _mono_kernel(T, a, S), None, (1, 1), (1, 1, 1, 1))
    check(monochromatic_conv2d(x, T, a, S, stride=1, padding=1), ref, np.float32)


def test_monochromatic_zf_conv1_shape(rng):
    """The benchmark geometry (7x7, stride 2, 224x224 -> 110x110) on a batch of 2, C' = 6, equal clusters."""
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    T = rng.standard_normal((6, 3)).astype(np.float32)
    a = np.repeat(np.arange(6), 16)
    S = rng.standard_normal((96, 7, 7)).astype(np.float32)
    got = monochromatic_conv2d(x, T, a, S, stride=2, padding=1)
    assert got.shape == (2, 96, 110, 110)
    ref = conv2d_einsum(x[:, :, :40, :40], _mono_kernel(T, a, S), None, (2, 2), (1, 1, 1, 1))
    rows = ref.shape[2] - 4                            # rows whose receptive field lies in the crop
    check(got[:, :, :rows, :rows], ref[:, :, :rows, :rows], np.float32)


def _compose_sep(V, Hh):
    K, C, X, _ = V.shape
    F, _, _, Y = Hh.shape
    W = np.zeros((F, C, X, Y))
    for k in range(K):
        W += Hh[:, k, 0, :][:, None, None, :] * V[k, :, :, 0][None, :, :, None]
    return W


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("direct", [True, False])
def test_separable(rng, dtype, geom, direct, monkeypatch):
    monkeypatch.setattr(FL, "_use_direct", lambda f, t: direct)
    N, C, H, W, X, Y, st, pad = geom
    K, F = 3, 5
    V = rng.standard_normal((K, C, X, 1)).astype(dtype)
    Hh = rng.standard_normal((F, K, 1, Y)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    ref = conv2d_einsum(x, _compose_sep(V, Hh), b, st, pad)
    check(separable_conv2d(x, V, Hh, b, stride=st, padding=pad), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("mk", [True, False])       # the 1x1 stage on the GEMM micro-kernel, or BLAS + a bias pass
@pytest.mark.parametrize("t", [5, 20])              # on the micro-kernel: the streaming product, then matmul
def test_lowrank_conv(rng, dtype, geom, direct, mk, t, monkeypatch):
    monkeypatch.setattr(FL, "_use_direct", lambda f, t: direct)
    monkeypatch.setattr(FL, "USE_MICROKERNEL", mk)
    N, C, H, W, X, Y, st, pad = geom
    F = 7
    first = rng.standard_normal((t, C, X, Y)).astype(dtype)
    second = rng.standard_normal((F, t)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Wfull = np.einsum("ft,tcxy->fcxy", second.astype(np.float64), first.astype(np.float64))
    ref = conv2d_einsum(x, Wfull, b, st, pad)
    check(lowrank_conv2d(x, first, second, b, stride=st, padding=pad), ref, dtype)
    check(lowrank_conv2d(x, first, second[:, :, None, None], b, stride=st, padding=pad), ref, dtype)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("mk", [True, False])
def test_two_stage_batch_chunks(rng, monkeypatch, direct, mk):
    """A tiny workspace bound forces one image per chunk; the result is unchanged."""
    monkeypatch.setattr(FL, "_WORKSPACE_BYTES", 1)
    monkeypatch.setattr(FL, "USE_MICROKERNEL", mk)
    monkeypatch.setattr(FL, "_use_direct", lambda f, t: direct)
    x = rng.standard_normal((3, 2, 9, 8)).astype(np.float32)
    first, second = rng.standard_normal((3, 2, 3, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    ref = conv2d_einsum(x, np.einsum("ft,tcxy->fcxy", second, first), b, (2, 1), (1, 1, 0, 2))
    check(lowrank_conv2d(x, first, second, b, stride=(2, 1), padding=(1, 1, 0, 2)), ref, np.float32)
    V, Hh = rng.standard_normal((3, 2, 3, 1)).astype(np.float32), rng.standard_normal((4, 3, 1, 3)).astype(np.float32)
    ref = conv2d_einsum(x, _compose_sep(V, Hh), b, (2, 2), (1, 0, 1, 1))
    check(separable_conv2d(x, V, Hh, b, stride=2, padding=(1, 0, 1, 1)), ref, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_kernel_several_chunks_per_band(rng, dtype, monkeypatch):
    """Wide single-channel rows: a band of output rows spans several accumulation chunks of the direct kernel."""
    import numba

    from npconv.kernels.cpu import lowrank as KL
    monkeypatch.setattr(FL, "_use_direct", lambda f, t: True)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)   # the band height: as on 2 cores, on any machine
    x = rng.standard_normal((1, 1, 70, 400)).astype(dtype)
    Ho, Wo, Wq = DR._plane_geometry(70, 400, 3, 3, (1, 1), (1, 1, 1, 1))
    band = DR._band_rows(Ho, 3, 1, Wq * x.itemsize)
    assert band > KL.CHUNK // Wq, (band, KL.CHUNK // Wq)       # the premise of this test, not a check of npconv
    first, second = rng.standard_normal((2, 1, 3, 3)).astype(dtype), rng.standard_normal((6, 2)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    ref = conv2d_einsum(x, np.einsum("ft,tcxy->fcxy", second, first), b, (1, 1), (1, 1, 1, 1))
    check(lowrank_conv2d(x, first, second, b, stride=1, padding=1), ref, dtype)


def test_lowrank_conv_dilation(rng):
    x = rng.standard_normal((1, 2, 9, 9))
    first = rng.standard_normal((3, 2, 3, 3))
    second = rng.standard_normal((4, 3))
    Wfull = np.einsum("ft,tcxy->fcxy", second, first)
    ref = conv2d_naive(x, Wfull, None, (1, 1), (1, 1, 1, 1), (2, 2))
    check(lowrank_conv2d(x, first, second, stride=1, padding=1, dilation=2), ref, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_linear(rng, dtype):
    x = rng.standard_normal((6, 10)).astype(dtype)
    a = rng.standard_normal((4, 3)).astype(dtype)
    bf = rng.standard_normal((3, 10)).astype(dtype)
    bias = rng.standard_normal(4).astype(dtype)
    ref = x.astype(np.float64) @ (a.astype(np.float64) @ bf.astype(np.float64)).T + bias
    check(lowrank_linear(x, a, bf, bias), ref, dtype)
    check(lowrank_linear(np.asfortranarray(x), a, bf), ref - bias, dtype)
    check(lowrank_linear(x[:, ::-1], a, bf[:, ::-1]), ref - bias, dtype)


def test_validation(rng):
    x = rng.standard_normal((1, 3, 8, 8))
    T, S, a = rng.standard_normal((2, 3)), rng.standard_normal((4, 3, 3)), np.array([0, 1, 0, 1])
    with pytest.raises(TypeError, match="dtype"):
        monochromatic_conv2d(x.astype(np.float32), T, a, S)
    with pytest.raises(TypeError, match="integer"):
        monochromatic_conv2d(x, T, a.astype(float), S)
    with pytest.raises(ValueError, match="assignment must lie"):
        monochromatic_conv2d(x, T, np.array([0, 1, 2, 0]), S)
    with pytest.raises(ValueError, match="assignment must have"):
        monochromatic_conv2d(x, T, a[:3], S)
    with pytest.raises(ValueError, match="color_transform"):
        monochromatic_conv2d(x, T[:, :2], a, S)
    with pytest.raises(ValueError, match="bias"):
        monochromatic_conv2d(x, T, a, S, np.zeros(3))
    with pytest.raises(ValueError, match="output"):
        monochromatic_conv2d(x, T, a, rng.standard_normal((4, 9, 9)))
    with pytest.raises(TypeError, match="float32 or float64"):
        monochromatic_conv2d(x.astype(np.int64), T, a, S)
    with pytest.raises(ValueError, match="vertical"):
        separable_conv2d(x, rng.standard_normal((2, 3, 3, 2)), rng.standard_normal((4, 2, 1, 3)))
    with pytest.raises(ValueError, match="horizontal"):
        separable_conv2d(x, rng.standard_normal((2, 3, 3, 1)), rng.standard_normal((4, 3, 1, 3)))
    with pytest.raises(ValueError, match="second"):
        lowrank_conv2d(x, rng.standard_normal((2, 3, 3, 3)), rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match="first"):
        lowrank_conv2d(x, rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((4, 2)))
    with pytest.raises(ValueError, match="b_fac"):
        lowrank_linear(rng.standard_normal((2, 5)), rng.standard_normal((3, 2)), rng.standard_normal((2, 4)))
    with pytest.raises(ValueError, match="a must"):
        lowrank_linear(rng.standard_normal((2, 5)), rng.standard_normal((3, 3)), rng.standard_normal((2, 5)))


@pytest.mark.torch
def test_against_torch(rng):
    import torch
    x = rng.standard_normal((2, 3, 20, 18)).astype(np.float32)
    T = rng.standard_normal((4, 3)).astype(np.float32)
    a = rng.integers(0, 4, 16)
    S = rng.standard_normal((16, 5, 5)).astype(np.float32)
    Wf = _mono_kernel(T, a, S).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(Wf), stride=2, padding=2).numpy()
    check(monochromatic_conv2d(x, T, a, S, stride=2, padding=2), ref.astype(np.float64), np.float32)


@pytest.mark.gpu
def test_gpu_matches_cpu(rng):
    import cupy as cp
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    T = rng.standard_normal((4, 3)).astype(np.float32)
    S = rng.standard_normal((8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    for a in (np.repeat(np.arange(4), 2), np.array([0, 0, 0, 1, 1, 3, 3, 3])):
        cpu = monochromatic_conv2d(x, T, a, S, b, stride=2, padding=1)
        gpu = monochromatic_conv2d(cp.asarray(x), cp.asarray(T), cp.asarray(a), cp.asarray(S), cp.asarray(b),
                                   stride=2, padding=1)
        check(cp.asnumpy(gpu), cpu.astype(np.float64), np.float32)
    V = rng.standard_normal((3, 3, 3, 1)).astype(np.float32)
    Hh = rng.standard_normal((8, 3, 1, 3)).astype(np.float32)
    cpu = separable_conv2d(x, V, Hh, b, stride=2, padding=1)
    gpu = separable_conv2d(*map(cp.asarray, (x, V, Hh, b)), stride=2, padding=1)
    check(cp.asnumpy(gpu), cpu.astype(np.float64), np.float32)
    first = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    second = rng.standard_normal((8, 4)).astype(np.float32)
    cpu = lowrank_conv2d(x, first, second, b, stride=2, padding=1)
    gpu = lowrank_conv2d(*map(cp.asarray, (x, first, second, b)), stride=2, padding=1)
    check(cp.asnumpy(gpu), cpu.astype(np.float64), np.float32)
    xl = rng.standard_normal((3, 10)).astype(np.float32)
    al, bl = rng.standard_normal((4, 2)).astype(np.float32), rng.standard_normal((2, 10)).astype(np.float32)
    check(cp.asnumpy(lowrank_linear(*map(cp.asarray, (xl, al, bl)))), lowrank_linear(xl, al, bl).astype(np.float64),
          np.float32)
