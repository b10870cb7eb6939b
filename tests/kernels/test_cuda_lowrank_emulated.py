"""The factored-layer kernels (``_lowrank.cu``: mono_conv, factor_conv) on the CPU emulator, with hand-written
launches, against NumPy references written here (the dense conv of the rebuilt kernel, tests/reference.py).

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
MONO_FT = 8
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
    kernel(lowrank_module, "factor_conv", dtype)(grid, block, args, shared_mem=CC * KH * KW * FACTOR_FT * dtype.itemsize,
                                                 order=order)
    check(y, ref, dtype, C * KH * KW)


# --- mono_conv -----------------------------------------------------------------------------------------------------

def mono_dense_kernel(T, a, S):
    """The dense kernel the monochromatic factors stand for: W[f, c] = T[a_f, c] * S[f], by loops."""
    F, X, Y = S.shape
    Wd = np.zeros((F, T.shape[1], X, Y))
    for f in range(F):
        for c in range(T.shape[1]):
            Wd[f, c] = T[a[f], c] * np.asarray(S[f], np.float64)
    return Wd


def colour_lists(a, Cp):
    """(order, starts) written independently of ops_lowrank: filters of each colour in increasing order."""
    order, starts = [], [0]
    for p in range(Cp):
        order += [f for f in range(len(a)) if a[f] == p]
        starts.append(len(order))
    return np.asarray(order, np.int32), np.asarray(starts, np.int32)


MONO_CASES = {
    # name: (N, C, H, W, KH, KW, stride, (top, bottom, left, right), assignment)
    "equal-3x3": (2, 3, 11, 13, 3, 3, (1, 1), (1, 1, 1, 1), [0, 1, 2, 0, 1, 2]),
    "zf-like-7x7s2": (1, 3, 21, 19, 7, 7, (2, 2), (1, 1, 1, 1), [0] * 10 + [1] * 3 + [2] * 4),   # 10 > 8: two passes
    "unequal-empty": (2, 4, 9, 10, 5, 3, (2, 1), (2, 0, 1, 3), [3, 3, 0, 3, 3, 0, 3]),          # colours 1, 2 empty
    "wide-padding": (1, 2, 5, 6, 2, 2, (1, 1), (3, 0, 0, 3), [1, 0, 1]),                         # all-zero windows
    "1x1-stride3": (2, 3, 8, 8, 1, 1, (3, 3), (0, 0, 0, 0), [0, 1, 1, 0]),
    "5x1": (1, 1, 9, 6, 5, 1, (1, 2), (2, 2, 0, 0), [0, 0]),
}
# (TW, TH, grid z) per launch: the full tile and z = N; a narrow tile, one row per block, and z = 1 (image loop)
MONO_LAUNCHES = {"forward-full": ("forward", 32, 8, None), "reverse-small": ("reverse", 8, 1, 1)}


def run_mono(lowrank_module, dtype, x, T, a, S, b, stride, pad, launch):
    order, TW, TH, gz = MONO_LAUNCHES[launch]
    N, C, H, W = x.shape
    Cp = T.shape[0]
    F, KH, KW = S.shape
    OH, OW = out_len(H, KH, stride[0], pad[0], pad[1]), out_len(W, KW, stride[1], pad[2], pad[3])
    tiles_w, tiles_h = -(-OW // TW), -(-OH // TH)
    perm, starts = colour_lists(a, Cp)
    TIH, TIW = (TH - 1) * stride[0] + KH, (TW - 1) * stride[1] + KW
    smem = (TIH * TIW + KH * KW * MONO_FT) * dtype.itemsize
    y = np.full((N, F, OH, OW), np.nan, dtype)
    args = (x, T, S, perm, starts, S if b is None else b, y,
            *map(i32, (N, C, H, W, F, KH, KW, *stride, pad[0], pad[2], OH, OW, tiles_w, b is not None)))
    kernel(lowrank_module, "mono_conv", dtype)((tiles_h * tiles_w, Cp, gz or N), (TW, TH), args, shared_mem=smem,
                                               order=order)
    return y


@pytest.mark.parametrize("launch", list(MONO_LAUNCHES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", sorted(MONO_CASES))
def test_mono_conv(lowrank_module, rng, dtype, launch, with_bias, case):
    N, C, H, W, KH, KW, stride, pad, a = MONO_CASES[case]
    F, Cp = len(a), max(a) + 1
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    T = rng.standard_normal((Cp, C)).astype(dtype)
    S = rng.standard_normal((F, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if with_bias else None
    y = run_mono(lowrank_module, dtype, x, T, a, S, b, stride, pad, launch)
    ref = conv2d_einsum(x, mono_dense_kernel(T, a, S), b, stride=stride, padding=pad)
    check(y, ref, dtype, C * KH * KW)


def test_mono_conv_tile_edges(lowrank_module, rng, dtype):
    """An output of 33 x 17 on 32 x 8 tiles: a 1-column tile on the right and a 1-row tile at the bottom."""
    N, C, KH, KW, stride, pad = 1, 2, 3, 3, (1, 1), (1, 1, 1, 1)
    a = [1, 0, 1, 0, 1]
    x = rng.standard_normal((N, C, 17, 33)).astype(dtype)
    T = rng.standard_normal((2, C)).astype(dtype)
    S = rng.standard_normal((5, KH, KW)).astype(dtype)
    y = run_mono(lowrank_module, dtype, x, T, a, S, None, stride, pad, "forward-full")
    check(y, conv2d_einsum(x, mono_dense_kernel(T, a, S), None, stride=stride, padding=pad), dtype, C * KH * KW)


def test_mono_conv_smem_formula_matches_ops():
    """ops_lowrank sizes the dynamic shared memory with the kernel's layout (checked here independently)."""
    for KH, KW, SH, SW, item in [(7, 7, 2, 2, 4), (3, 3, 1, 1, 8), (11, 11, 4, 4, 8), (5, 1, 1, 2, 4)]:
        TW, TH, smem = ops_lowrank.mono_tiling(KH, KW, SH, SW, item)
        assert smem == (((TH - 1) * SH + KH) * ((TW - 1) * SW + KW) + KH * KW * MONO_FT) * item
        assert smem <= ops_lowrank.MONO_SMEM_BUDGET and TW * TH <= 256
    assert ops_lowrank.mono_tiling(7, 7, 2, 2, 4)[:2] == (32, 8)       # ZF conv1 gets the full tile
    assert ops_lowrank.mono_tiling(11, 11, 4, 4, 8)[1] < 8              # a large f64 kernel gets fewer rows
    assert ops_lowrank.mono_tiling(40, 40, 4, 4, 8) is None             # too large: the composed fallback
