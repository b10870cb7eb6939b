"""The factored-layer kernels (``_lowrank.cu``: mono_conv, factor_conv, lr_expand<TB>, lr_conv<TB>, sep_conv<KB>) on
the CPU emulator, with hand-written launches, against NumPy references written here (the dense conv of the rebuilt
kernel, tests/reference.py; plain loops for lr_expand, lr_conv and sep_conv).

Every case runs in both thread orders and with two launch shapes (a full grid, and a small grid / small block so
the grid-stride and image loops wrap), for float32 and float64. Outputs start as NaN, so an element no thread
writes fails the comparison; shared memory starts as NaN, so a read of a location no thread wrote does too.
"""
from __future__ import annotations

import numpy as np
import pytest
from cuda_emulator import CpuRawModule
from reference import conv2d_einsum

from npconv.kernels.cuda import loader, ops_lowrank

pytestmark = pytest.mark.cpuemu
i32 = np.int32
FACTOR_FT = 16


@pytest.fixture(scope="module")
def lowrank_module():
    """dtype -> the emulated module of _lowrank.cu (g++ runs once; later sessions hit the emulator's cache)."""
    mods = {}

    def get(dtype):
        dt = np.dtype(dtype)
        if dt not in mods:
            mods[dt] = CpuRawModule(ops_lowrank.source_text(dt), name="_lowrank.cu")
        return mods[dt]
    return get


def kernel(lowrank_module, name, dtype):
    return lowrank_module(dtype).get_function(loader.kernel_name(name, dtype))


def check(got, ref, dtype, taps):
    """float32 sums of ``taps`` products: the tolerance grows with the length of the sum."""
    tol = (2e-5 if np.dtype(dtype) == np.float32 else 1e-12) * max(1.0, np.sqrt(taps))
    assert not np.isnan(got).any(), "some outputs were never written"
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def out_len(size, k, s, lo, hi, d=1):
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


LAUNCHES = ["forward-full", "reverse-small"]


# --- factor_conv ---------------------------------------------------------------------------------------------------

FACTOR_CASES = [
    # N, C, H, W, F, KH, KW, stride, (top, bottom, left, right), dilation, CC (channels per smem chunk)
    (2, 3, 9, 10, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 3),          # one chunk, F < 16
    (2, 5, 8, 9, 20, 3, 2, (2, 1), (1, 0, 2, 1), (1, 2), 2),          # chunks 2+2+1, two filter blocks
    (1, 4, 11, 7, 6, 7, 1, (2, 1), (3, 3, 0, 0), (1, 1), 4),          # vertical pass of a separable layer
    (2, 6, 5, 12, 17, 1, 5, (1, 3), (0, 0, 2, 2), (1, 1), 4),         # horizontal pass, column stride
    (1, 2, 5, 6, 3, 2, 2, (1, 1), (3, 0, 0, 3), (1, 1), 1),           # padding wider than the kernel
    (2, 3, 9, 9, 4, 1, 1, (3, 2), (0, 0, 0, 0), (1, 1), 3),           # 1x1, stride larger than the kernel
    (1, 1, 6, 6, 16, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1),          # dilated, F exactly one block
]


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", FACTOR_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_factor_conv(lowrank_module, rng, dtype, launch, with_bias, case):
    N, C, H, W, F, KH, KW, stride, pad, dil, CC = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ref = conv2d_einsum(x, w, b if with_bias else None, stride=stride, padding=pad, dilation=dil)
    OH, OW = ref.shape[2:]
    y = np.full(ref.shape, np.nan, dtype)
    total = N * OH * OW
    if launch == "forward-full":
        order, grid, block = "forward", (-(-total // 256), -(-F // FACTOR_FT)), (256,)
    else:
        order, grid, block = "reverse", (2, -(-F // FACTOR_FT)), (32,)
    args = (x, w, b if with_bias else w, y,
            *map(i32, (N, C, H, W, F, KH, KW, *stride, pad[0], pad[2], *dil, OH, OW, CC, with_bias)))
    smem = CC * KH * KW * FACTOR_FT * dtype.itemsize
    kernel(lowrank_module, "factor_conv", dtype)(grid, block, args, shared_mem=smem, order=order)
    check(y, ref, dtype, C * KH * KW)


# --- lr_expand<TB> --------------------------------------------------------------------------------------------------

#: TB -> pixels a thread, as documented in _lowrank.cu (NPCONV_LR_EXPAND(TB, PIX))
LR_PIX = {8: 4, 16: 4, 32: 2}

LR_CASES = [
    # N, T, F, P, TB, FB, block: T below and at TB, F not a multiple of FB, P not a multiple of PIX * block
    (2, 5, 7, 37, 8, 7, 32),           # one filter block, the last block's pixels partly past P
    (1, 8, 20, 130, 8, 6, 32),         # T = TB; 4 filter blocks, the last with 2 filters
    (3, 11, 9, 64, 16, 4, 16),         # T between 8 and 16; P a multiple of PIX * block
    (1, 16, 3, 5, 16, 8, 64),          # FB larger than F, fewer pixels than threads
    (2, 20, 13, 77, 32, 5, 32),        # T between 16 and 32
    (1, 32, 4, 100, 32, 4, 64),        # T = 32
    (2, 1, 10, 33, 8, 3, 32),          # rank 1
]


def lr_loops(h, second, b):
    """y[n, f, p] = b[f] + sum_k second[f, k] * h[n, k, p], by loops over n and f (float64)."""
    N, T, P = h.shape
    F = second.shape[0]
    y = np.zeros((N, F, P))
    for n in range(N):
        for f in range(F):
            acc = np.zeros(P) + (0.0 if b is None else float(b[f]))
            for k in range(T):
                acc += float(second[f, k]) * h[n, k].astype(np.float64)
            y[n, f] = acc
    return y


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", LR_CASES, ids=lambda c: "x".join(map(str, c)))
def test_lr_expand(lowrank_module, rng, dtype, order, with_bias, case):
    N, T, F, P, TB, FB, block = case
    h = rng.standard_normal((N, T, P)).astype(dtype)
    second = rng.standard_normal((F, T)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = np.full((N, F, P), np.nan, dtype)
    grid = (-(-P // (LR_PIX[TB] * block)), -(-F // FB), N)
    args = (h, second, b if with_bias else second, y, *map(i32, (N, T, F, P, FB, with_bias)))
    kernel(lowrank_module, f"lr_expand{TB}", dtype)(grid, (block,), args,
                                                    shared_mem=FB * (TB + 1) * dtype.itemsize, order=order)
    check(y, lr_loops(h, second, b if with_bias else None), dtype, T)


def test_lr_expand_writes_nothing_outside_its_images(lowrank_module, rng):
    """A launch over the middle image of three (pointers offset by one image) leaves the others untouched."""
    dtype = np.dtype(np.float32)
    N, T, F, P = 3, 6, 10, 50
    h = rng.standard_normal((N, T, P)).astype(dtype)
    second, b = rng.standard_normal((F, T)).astype(dtype), rng.standard_normal(F).astype(dtype)
    y = np.full((N, F, P), np.nan, dtype)
    args = (h[1:2], second, b, y[1:2], *map(i32, (1, T, F, P, 4, 1)))
    kernel(lowrank_module, "lr_expand8", dtype)((2, 3, 1), (32,), args, shared_mem=4 * 9 * 4, order="reverse")
    assert np.isnan(y[0]).all() and np.isnan(y[2]).all()
    check(y[1:2], lr_loops(h[1:2], second, b), dtype, T)


# --- lr_conv<TB> ----------------------------------------------------------------------------------------------------

LRC_UNROLL = 4
LRC_CASES = [
    # N, C, H, W, T, F, KH, KW, stride, (top, bottom, left, right), dilation, TB, CC, FC
    (2, 3, 11, 12, 5, 7, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, 3, 7),         # one chunk each
    (1, 3, 23, 21, 8, 20, 7, 7, (2, 2), (1, 1, 1, 1), (1, 1), 8, 2, 6),        # ZF conv1-like; chunks 2+1, 6*3+2
    (2, 5, 9, 8, 11, 9, 3, 2, (2, 1), (1, 0, 2, 1), (1, 2), 16, 2, 4),         # 27 taps a 2-channel chunk: padded
    (1, 4, 10, 7, 16, 3, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 16, 4, 8),       # 1x1 first stage, FC > F
    (2, 2, 8, 9, 20, 5, 5, 3, (1, 3), (3, 0, 0, 2), (1, 1), 32, 1, 2),         # padding wider than the kernel
    (1, 6, 6, 6, 32, 4, 2, 2, (1, 1), (0, 0, 0, 0), (2, 2), 32, 5, 3),         # T = 32, dilated
    (3, 1, 5, 5, 1, 2, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, 1, 1),           # rank 1, one filter a chunk
]


def lr_conv_smem(C, KH, KW, TB, CC, FC):
    """Elements of lr_conv's shared memory, from the layout documented in _lowrank.cu."""
    return max(-(-CC * KH * KW // LRC_UNROLL) * LRC_UNROLL * TB, FC * (TB + 1))


@pytest.mark.parametrize("launch", ["forward-128", "reverse-32"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case,pix", [(c, px) for c in LRC_CASES for px in (1, 2) if px == 1 or c[11] != 32],
                         ids=lambda v: "x".join(map(str, v[:8])) if isinstance(v, tuple) else f"px{v}")
def test_lr_conv(lowrank_module, rng, dtype, launch, with_bias, case, pix):
    """lr_conv<TB> (one pixel a thread) and lr_conv<TB>_px2 (two, pixels blockDim apart; not compiled for TB = 32)."""
    N, C, H, W, T, F, KH, KW, stride, pad, dil, TB, CC, FC = case
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    first = rng.standard_normal((T, C, KH, KW)).astype(dtype)
    second, b = rng.standard_normal((F, T)).astype(dtype), rng.standard_normal(F).astype(dtype)
    dense = np.einsum("ft,tcxy->fcxy", second.astype(np.float64), first.astype(np.float64))
    ref = conv2d_einsum(x, dense, b if with_bias else None, stride=stride, padding=pad, dilation=dil)
    OH, OW = ref.shape[2:]
    y = np.full(ref.shape, np.nan, dtype)
    order, block = launch.split("-")
    block = int(block)
    args = (x, first, second, b if with_bias else second, y,
            *map(i32, (N, C, H, W, T, F, KH, KW, *stride, pad[0], pad[2], *dil, OH, OW, CC, FC, with_bias)))
    name = f"lr_conv{TB}" + ("_px2" if pix == 2 else "")
    kernel(lowrank_module, name, dtype)((-(-N * OH * OW // (pix * block)),), (block,), args,
                                        shared_mem=lr_conv_smem(C, KH, KW, TB, CC, FC) * dtype.itemsize, order=order)
    check(y, ref, dtype, C * KH * KW * T)


def test_lr_conv_against_loops(lowrank_module, rng):
    """A second reference: the two stages by plain loops (first stage by taps, then the 1x1 stage by lr_loops)."""
    dtype = np.dtype(np.float64)
    N, C, H, W, T, F, KH, KW = 2, 3, 9, 10, 6, 5, 3, 4
    stride, pad = (2, 1), (1, 2, 0, 1)
    x = rng.standard_normal((N, C, H, W))
    first, second, b = rng.standard_normal((T, C, KH, KW)), rng.standard_normal((F, T)), rng.standard_normal(F)
    OH, OW = out_len(H, KH, stride[0], pad[0], pad[1]), out_len(W, KW, stride[1], pad[2], pad[3])
    xp = np.zeros((N, C, H + pad[0] + pad[1], W + pad[2] + pad[3]))
    xp[:, :, pad[0]:pad[0] + H, pad[2]:pad[2] + W] = x
    h = np.zeros((N, T, OH, OW))
    for i in range(OH):
        for j in range(OW):
            win = xp[:, :, i * stride[0]:i * stride[0] + KH, j * stride[1]:j * stride[1] + KW]
            for k in range(T):
                h[:, k, i, j] = (win * first[k]).sum(axis=(1, 2, 3))
    ref = lr_loops(h.reshape(N, T, -1), second, b).reshape(N, F, OH, OW)
    y = np.full(ref.shape, np.nan)
    args = (x, first, second, b, y, *map(i32, (N, C, H, W, T, F, KH, KW, *stride, pad[0], pad[2], 1, 1, OH, OW,
                                               2, 3, 1)))
    kernel(lowrank_module, "lr_conv8", dtype)((-(-N * OH * OW // 64),), (64,), args,
                                              shared_mem=lr_conv_smem(C, KH, KW, 8, 2, 3) * 8, order="reverse")
    check(y, ref, dtype, C * KH * KW * T)


# --- sep_conv<KB> ---------------------------------------------------------------------------------------------------

SEP_TC, SEP_FT = 32, 16
SEP_CASES = [
    # N, C, H, W, K, F, X, Y, stride, (top, bottom, left, right), KB, TR
    (1, 3, 23, 40, 4, 20, 7, 7, (2, 2), (1, 1, 1, 1), 4, 4),        # ZF conv1-like: two filter passes, 16 + 4
    (2, 2, 9, 70, 3, 5, 3, 5, (1, 1), (1, 1, 2, 2), 4, 2),          # K < KB; 70 columns: 3 column tiles, the last short
    (1, 5, 11, 13, 8, 16, 5, 3, (2, 3), (0, 2, 3, 0), 8, 1),        # asymmetric padding, column stride 3
    (2, 1, 6, 8, 7, 33, 2, 4, (1, 2), (3, 3, 4, 4), 8, 4),          # padding wider than the kernel, 3 filter passes
    (1, 4, 9, 9, 16, 3, 1, 1, (3, 1), (0, 0, 0, 0), 16, 2),         # 1 x 1 both ways, K = 16
    (3, 2, 5, 33, 10, 17, 3, 3, (1, 1), (1, 1, 1, 1), 16, 4),       # OH (5) not a multiple of TR, 3 images
]


def sep_loops(x, V, Hz, b, stride, pad):
    """The separable conv by plain loops (float64): h = the vertical taps down the rows (row stride, top/bottom zero
    padding), then the horizontal taps along the columns of h (column stride, left/right zero padding)."""
    N, C, H, W = x.shape
    K, X, F, Y = V.shape[0], V.shape[2], Hz.shape[0], Hz.shape[2]
    OH, OW = out_len(H, X, stride[0], pad[0], pad[1]), out_len(W, Y, stride[1], pad[2], pad[3])
    xp = np.zeros((N, C, H + pad[0] + pad[1] + X, W))
    xp[:, :, pad[0]:pad[0] + H] = x
    h = np.zeros((N, K, OH, W + pad[2] + pad[3] + Y))
    for i in range(OH):
        for xx in range(X):
            h[:, :, i, pad[2]:pad[2] + W] += np.einsum("kc,ncw->nkw", V[:, :, xx].astype(np.float64),
                                                       xp[:, :, i * stride[0] + xx])
    y = np.zeros((N, F, OH, OW))
    for j in range(OW):
        for yy in range(Y):
            y[:, :, :, j] += np.einsum("fk,nki->nfi", Hz[:, :, yy].astype(np.float64), h[:, :, :, j * stride[1] + yy])
    if b is not None:
        y += b.reshape(1, F, 1, 1)
    return y


def sep_smem(K, C, X, Y, SW, KB, TR):
    """Elements of sep_conv's shared memory, from the layout documented in _lowrank.cu."""
    return K * Y * SEP_FT + SEP_FT + C * X * KB + KB * TR * ((SEP_TC - 1) * SW + Y)


@pytest.mark.parametrize("launch", ["forward-all", "reverse-16", "forward-5"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", SEP_CASES, ids=lambda c: "x".join(map(str, c[:8])))
def test_sep_conv(lowrank_module, rng, dtype, launch, with_bias, case):
    """sep_conv<KB> with all the filters a block, or shares of FS filters (grid z): whole 16-filter passes as
    ops_lowrank launches it, or 5, a share ending inside a pass. The output starts as NaN: a filter no share writes
    shows."""
    N, C, H, W, K, F, X, Y, stride, pad, KB, TR = case
    order, fs = launch.split("-")
    FS = F if fs == "all" else int(fs)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    V, Hz = rng.standard_normal((K, C, X)).astype(dtype), rng.standard_normal((F, K, Y)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ref = sep_loops(x, V, Hz, b if with_bias else None, stride, pad)
    OH, OW = ref.shape[2:]
    y = np.full(ref.shape, np.nan, dtype)
    tiles_w = -(-OW // SEP_TC)
    args = (x, V, Hz, b if with_bias else Hz, y,
            *map(i32, (N, C, H, W, K, F, X, Y, *stride, pad[0], pad[2], OH, OW, tiles_w, with_bias, FS)))
    kernel(lowrank_module, f"sep_conv{KB}", dtype)((-(-OH // TR) * tiles_w, N, -(-F // FS)), (TR * SEP_TC,), args,
                                                   shared_mem=sep_smem(K, C, X, Y, stride[1], KB, TR) * dtype.itemsize,
                                                   order=order)
    check(y, ref, dtype, C * X * K * Y)


@pytest.mark.parametrize("FS", [5, 16])
def test_sep_conv_share_writes_only_its_filters(lowrank_module, rng, FS):
    """The first two shares launched alone (grid z = 2 of ceil(33 / FS)): filters [0, 2 FS) are right and the rest
    are left as they were (NaN). The emulator runs blocks in order, so in a full grid the next share would hide a
    share that also wrote its filters."""
    dtype = np.dtype(np.float32)
    N, C, H, W, K, F, X, Y, stride, pad, KB, TR = SEP_CASES[3]                 # 33 filters, 3 passes
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    V, Hz = rng.standard_normal((K, C, X)).astype(dtype), rng.standard_normal((F, K, Y)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ref = sep_loops(x, V, Hz, b, stride, pad)
    OH, OW = ref.shape[2:]
    y = np.full(ref.shape, np.nan, dtype)
    tiles_w = -(-OW // SEP_TC)
    args = (x, V, Hz, b, y, *map(i32, (N, C, H, W, K, F, X, Y, *stride, pad[0], pad[2], OH, OW, tiles_w, 1, FS)))
    kernel(lowrank_module, f"sep_conv{KB}", dtype)((-(-OH // TR) * tiles_w, N, 2), (TR * SEP_TC,), args,
                                                   shared_mem=sep_smem(K, C, X, Y, stride[1], KB, TR) * 4)
    check(y[:, :2 * FS], ref[:, :2 * FS], dtype, C * X * K * Y)
    assert np.isnan(y[:, 2 * FS:]).all()


def test_sep_conv_against_the_dense_kernel(lowrank_module, rng):
    """A second reference: the dense conv of the rebuilt kernel W[f, c, x, y] = sum_k Hz[f, k, y] V[k, c, x]."""
    dtype = np.dtype(np.float32)
    N, C, H, W, K, F, X, Y, stride, pad, KB, TR = SEP_CASES[0]
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    V, Hz = rng.standard_normal((K, C, X)).astype(dtype), rng.standard_normal((F, K, Y)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    ref = conv2d_einsum(x, np.einsum("fky,kcx->fcxy", Hz.astype(np.float64), V.astype(np.float64)), b,
                        stride=stride, padding=pad)
    OH, OW = ref.shape[2:]
    y = np.full(ref.shape, np.nan, dtype)
    args = (x, V, Hz, b, y, *map(i32, (N, C, H, W, K, F, X, Y, *stride, pad[0], pad[2], OH, OW, -(-OW // SEP_TC), 1,
                                       F)))
    kernel(lowrank_module, "sep_conv4", dtype)((-(-OH // TR) * -(-OW // SEP_TC), N), (TR * SEP_TC,), args,
                                               shared_mem=sep_smem(K, C, X, Y, stride[1], KB, TR) * 4)
    check(y, ref, dtype, C * X * K * Y)


# --- mono_conv -----------------------------------------------------------------------------------------------------

def mono_dense_kernel(T, a, S):
    """The dense kernel the monochromatic factors stand for: W[f, c] = T[a_f, c] * S[f], by loops."""
    F, X, Y = S.shape
    Wd = np.zeros((F, T.shape[1], X, Y))
    for f in range(F):
        for c in range(T.shape[1]):
            Wd[f, c] = T[a[f], c] * np.asarray(S[f], np.float64)
    return Wd


def mono_loops(x, T, a, S, b, stride, pad):
    """The monochromatic conv by plain loops over outputs and taps (float64): y[n, f, i, j] =
    sum_{kh, kw} S[f, kh, kw] * sum_c T[a_f, c] * x[n, c, i*SH + kh - top, j*SW + kw - left], zero outside."""
    N, C, H, W = x.shape
    F, KH, KW = S.shape
    OH, OW = out_len(H, KH, stride[0], pad[0], pad[1]), out_len(W, KW, stride[1], pad[2], pad[3])
    xp = np.zeros((N, C, H + pad[0] + pad[1] + KH, W + pad[2] + pad[3] + KW))
    xp[:, :, pad[0]:pad[0] + H, pad[2]:pad[2] + W] = x
    y = np.zeros((N, F, OH, OW))
    for f in range(F):
        colour = np.einsum("c,nchw->nhw", T[a[f]].astype(np.float64), xp)
        for kh in range(KH):
            for kw in range(KW):
                win = colour[:, kh:kh + (OH - 1) * stride[0] + 1:stride[0], kw:kw + (OW - 1) * stride[1] + 1:stride[1]]
                y[:, f] += float(S[f, kh, kw]) * win
        if b is not None:
            y[:, f] += float(b[f])
    return y


def colour_lists(a, Cp):
    """(order, starts) written independently of ops_lowrank: filters of each colour in increasing order."""
    order, starts = [], [0]
    for p in range(Cp):
        order += [f for f in range(len(a)) if a[f] == p]
        starts.append(len(order))
    return np.asarray(order, np.int32), np.asarray(starts, np.int32)


def _groups(sizes):
    """An assignment whose colour p has sizes[p] filters, the filters interleaved across colours."""
    a = [p for p, k in enumerate(sizes) for _ in range(k)]
    return [a[i] for i in np.random.default_rng(7).permutation(len(a))]


MONO_CASES = {
    # name: (N, C, H, W, KH, KW, stride, (top, bottom, left, right), assignment)
    "equal-3x3": (2, 3, 11, 13, 3, 3, (1, 1), (1, 1, 1, 1), [0, 1, 2, 0, 1, 2]),
    "zf-like-7x7s2": (1, 3, 21, 19, 7, 7, (2, 2), (1, 1, 1, 1), [0] * 10 + [1] * 3 + [2] * 4),   # passes 8+2, 4, 4
    "unequal-empty": (2, 4, 9, 10, 5, 3, (2, 1), (2, 0, 1, 3), [3, 3, 0, 3, 3, 0, 3]),          # colours 1, 2 empty
    "wide-padding": (1, 2, 5, 6, 2, 2, (1, 1), (3, 0, 0, 3), [1, 0, 1]),                         # all-zero windows
    "1x1-stride3": (2, 3, 8, 8, 1, 1, (3, 3), (0, 0, 0, 0), [0, 1, 1, 0]),
    "5x1": (1, 1, 9, 6, 5, 1, (1, 2), (2, 2, 0, 0), [0, 0]),
    # colours of 1, 3, 4, 5 and 17 filters: passes 2; 4; 4; 8; 8+8+2 (every pass width, spare accumulators)
    "groups-1-3-4-5-17-s1": (1, 3, 9, 37, 3, 3, (1, 1), (1, 1, 1, 1), _groups([1, 3, 4, 5, 17])),
    "groups-1-3-4-5-17-s2": (1, 3, 19, 40, 5, 5, (2, 2), (2, 1, 0, 2), _groups([5, 1, 17, 4, 3])),
    "groups-6-7-8-9-s2x1": (1, 2, 12, 20, 3, 4, (2, 1), (1, 1, 2, 1), _groups([6, 7, 8, 9])),  # 8, 8, 8, 8+2
    "many-colours": (1, 3, 10, 12, 3, 3, (1, 1), (1, 1, 1, 1), _groups([1, 2, 0, 3, 1, 4, 2, 1, 5, 1, 2, 1] * 3)),
    "c5-kernel-narrower-than-stride": (2, 5, 11, 23, 2, 1, (3, 2), (0, 1, 1, 0), _groups([2, 3])),  # C > 4; SW > KW
}
# launch name -> (thread order, TW, TH, extra row padding): the three compiled block widths; blocks that cut the
# output at the right and bottom; a row stride longer than the smallest (the kernel must use RS, not recompute it)
MONO_LAUNCHES = {
    "forward-32x2": ("forward", 32, 2, 0),
    "reverse-16x3": ("reverse", 16, 3, 5),
    "reverse-8x1": ("reverse", 8, 1, 0),
    "forward-8x5": ("forward", 8, 5, 3),
}


def mono_layout(KH, KW, SH, SW, TW, TH, extra=0):
    """(TIH, TIW, RS, smem elements) of a TW x TH block, from the layout documented in _lowrank.cu: 2 rows and 4
    columns a thread, the weights of an 8-filter pass, then the colour tile with SW phase rows of ceil(TIW/SW)."""
    TIH, TIW = (2 * TH - 1) * SH + KH, (4 * TW - 1) * SW + KW
    RS = SW * -(-TIW // SW) + extra
    return TIH, TIW, RS, KH * KW * 8 + TIH * RS


def run_mono(lowrank_module, dtype, x, T, a, S, b, stride, pad, launch, splits=1):
    order, TW, TH, extra = MONO_LAUNCHES[launch]
    N, C, H, W = x.shape
    Cp = T.shape[0]
    F, KH, KW = S.shape
    OH, OW = out_len(H, KH, stride[0], pad[0], pad[1]), out_len(W, KW, stride[1], pad[2], pad[3])
    tiles_w, tiles_h = -(-OW // (4 * TW)), -(-OH // (2 * TH))
    perm, starts = colour_lists(a, Cp)
    _, _, RS, smem = mono_layout(KH, KW, stride[0], stride[1], TW, TH, extra)
    y = np.full((N, F, OH, OW), np.nan, dtype)
    args = (x, T, S, perm, starts, S if b is None else b, y,
            *map(i32, (N, C, H, W, F, KH, KW, *stride, pad[0], pad[2], OH, OW, tiles_w, RS, b is not None, splits)))
    kernel(lowrank_module, "mono_conv", dtype)((tiles_h * tiles_w, Cp * splits, N), (TW, TH), args,
                                               shared_mem=smem * dtype.itemsize, order=order)
    return y


def mono_inputs(rng, dtype, case, with_bias):
    N, C, H, W, KH, KW, stride, pad, a = MONO_CASES[case]
    F, Cp = len(a), max(a) + 1
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    T = rng.standard_normal((Cp, C)).astype(dtype)
    S = rng.standard_normal((F, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if with_bias else None
    return x, T, a, S, b, stride, pad


@pytest.mark.parametrize("launch", list(MONO_LAUNCHES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", sorted(MONO_CASES))
def test_mono_conv(lowrank_module, rng, dtype, launch, with_bias, case):
    x, T, a, S, b, stride, pad = mono_inputs(rng, dtype, case, with_bias)
    y = run_mono(lowrank_module, dtype, x, T, a, S, b, stride, pad, launch)
    ref = conv2d_einsum(x, mono_dense_kernel(T, a, S), b, stride=stride, padding=pad)
    check(y, ref, dtype, x.shape[1] * S.shape[1] * S.shape[2])


@pytest.mark.parametrize("case", ["groups-1-3-4-5-17-s2", "many-colours", "c5-kernel-narrower-than-stride"])
def test_mono_conv_against_loops(lowrank_module, rng, dtype, case):
    """A second reference, plain loops over the taps of the colour images (no dense kernel, no conv routine)."""
    x, T, a, S, b, stride, pad = mono_inputs(rng, dtype, case, True)
    y = run_mono(lowrank_module, dtype, x, T, a, S, b, stride, pad, "forward-8x5")
    check(y, mono_loops(x, T, a, S, b, stride, pad), dtype, x.shape[1] * S.shape[1] * S.shape[2])


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("case", ["zf-like-7x7s2", "groups-1-3-4-5-17-s2", "unequal-empty"])
def test_mono_conv_colour_shares(lowrank_module, rng, dtype, case, splits):
    """Each colour's filters shared by ``splits`` blocks (grid y = C' * splits), in shares of a multiple of 4
    filters: colours of 17 filters split 12 + 5, 8 + 8 + 1 or 4 + 4 + 4 + 4 + 1 (a 4- and a 1-filter pass end a
    share), shares past a colour's last filter and empty colours leave at once."""
    x, T, a, S, b, stride, pad = mono_inputs(rng, dtype, case, True)
    y = run_mono(lowrank_module, dtype, x, T, a, S, b, stride, pad, "reverse-16x3", splits=splits)
    check(y, mono_loops(x, T, a, S, b, stride, pad), dtype, x.shape[1] * S.shape[1] * S.shape[2])


def test_mono_conv_tile_edges(lowrank_module, rng, dtype):
    """An output of 17 x 65 on 6 x 64 tiles (16 x 3 threads): the second column of tiles holds one valid output
    column, and in the last row of tiles the threads of ty = 2 have their second row slot past the bottom."""
    N, C, KH, KW, stride, pad = 1, 2, 3, 3, (1, 1), (1, 1, 1, 1)
    a = [1, 0, 1, 0, 1]
    x = rng.standard_normal((N, C, 17, 65)).astype(dtype)
    T = rng.standard_normal((2, C)).astype(dtype)
    S = rng.standard_normal((5, KH, KW)).astype(dtype)
    y = run_mono(lowrank_module, dtype, x, T, a, S, None, stride, pad, "reverse-16x3")
    check(y, conv2d_einsum(x, mono_dense_kernel(T, a, S), None, stride=stride, padding=pad), dtype, C * KH * KW)


@pytest.mark.parametrize("item", [4, 8])
def test_mono_tiling_matches_the_kernel_layout(item):
    """ops_lowrank sizes the dynamic shared memory with the kernel's layout (checked here independently), keeps it
    within the budget and the block within the kernel's compiled widths and launch bound."""
    geoms = [(110, 110, 3, 7, 7, 2, 2), (32, 32, 3, 5, 5, 1, 1), (55, 55, 3, 11, 11, 4, 4), (224, 224, 3, 3, 3, 1, 1),
             (13, 13, 256, 3, 3, 1, 1), (5, 4, 3, 3, 3, 1, 1), (7, 300, 3, 5, 1, 1, 2), (9, 9, 3, 1, 1, 3, 3)]
    for OH, OW, C, KH, KW, SH, SW in geoms:
        TW, TH, RS, smem = ops_lowrank.mono_tiling(OH, OW, C, KH, KW, SH, SW, item)
        assert TW in (8, 16, 32) and 1 <= TW * TH <= 256
        TIH, TIW, RS0, elems = mono_layout(KH, KW, SH, SW, TW, TH)
        assert RS0 <= RS < RS0 + 32
        assert smem == elems * item + (RS - RS0) * TIH * item <= ops_lowrank.MONO_SMEM_BUDGET
        if TW == 32:
            assert RS == RS0                       # a warp is one row of threads: no padding needed
        elif any((SH * (RS0 + k) - TW) % 32 == 0 for k in range(32)):
            assert (SH * RS - TW) % 32 == 0        # a warp's rows of threads read consecutive banks
    assert ops_lowrank.mono_tiling(10, 10, 3, 40, 40, 4, 4, item) is None   # too large: the composed fallback
