"""The biclustered layers' kernels (``_bicluster.cu``) on the CPU emulator, with hand-written launches, against NumPy
references written here: each component as a reduction followed by the dense conv of its separable filter
(tests/reference.py), the SVD block conv as a dense grouped conv, the shared-filter maps and their combination by
loops over the definitions.

Every case runs in float32 and float64, with two launch shapes: a full grid in forward thread order, and a small
block / small grid in reverse order, so that the tile, grid-stride and image loops wrap. Outputs and shared memory
start as NaN, so an element no thread writes, or a shared value read before any thread wrote it, fails the
comparison. The launch geometry here is worked out independently of ops_bicluster.
"""
from __future__ import annotations

import numpy as np
import pytest
from bicluster_reference import cp_front_name
from cuda_emulator import CpuRawModule
from reference import conv2d_einsum

from npconv.kernels.cuda import loader, ops_bicluster

pytestmark = pytest.mark.cpuemu
i32 = np.int32
TH_MAX = 8  # most output rows of a bic_cp_front tile (NPCONV_BIC_TH)
FT = 16    # filters per bic_svd_spatial block (NPCONV_BIC_FT)
LAUNCHES = ["forward-full", "reverse-small"]


@pytest.fixture(scope="module")
def bic_module():
    """dtype -> the emulated module of _bicluster.cu (g++ runs once; later sessions hit the emulator's cache)."""
    mods = {}

    def get(dtype):
        dt = np.dtype(dtype)
        if dt not in mods:
            mods[dt] = CpuRawModule(ops_bicluster.source_text(dt), name="_bicluster.cu")
        return mods[dt]
    return get


def kernel(bic_module, name, dtype):
    return bic_module(dtype).get_function(loader.kernel_name(name, dtype))


def check(got, ref, dtype, taps):
    """float32 sums of ``taps`` products: the tolerance grows with the length of the sum."""
    tol = (2e-5 if np.dtype(dtype) == np.float32 else 1e-12) * max(1.0, np.sqrt(taps))
    assert not np.isnan(got).any(), "some outputs were never written"
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def out_len(size, k, s, lo, hi):
    return (size + lo + hi - k) // s + 1


def group_of(in_off):
    return np.repeat(np.arange(len(in_off) - 1), np.diff(in_off))


def sep_conv(img, v, h, stride, pad):
    """img (N, H, W) float64 through the X x Y filter outer(v, h): the dense conv (N, OH, OW)."""
    w = np.outer(np.asarray(v, np.float64), np.asarray(h, np.float64))[None, None]
    return conv2d_einsum(img[:, None], w, None, stride=stride, padding=pad)[:, 0]


def tile_launch(launch, N, smem_of):
    """(thread order, tile columns, tile rows, grid z, shared-memory bytes) of a tiled kernel for one launch shape:
    a 32-column tile with the most rows (8, 4, 2, 1) whose ``smem_of(TW, TH)`` fits 48 KiB and z = N; or a narrow
    tile of 2 rows and z = 1 (the image loop)."""
    if launch == "forward-full":
        TH = next(th for th in (8, 4, 2, 1) if smem_of(32, th) <= 48 * 1024)
        return "forward", 32, TH, N, smem_of(32, TH)
    return "reverse", 8, 2, 1, smem_of(8, 2)


# --- bic_cp_front ----------------------------------------------------------------------------------------------------

CP_CASES = {
    # name: (N, C, H, W, input group sizes, NH, K, X, Y, stride, (top, bottom, left, right))
    "equal-3x3": (2, 6, 9, 11, (2, 2, 2), 2, 3, 3, 3, (1, 1), (1, 1, 1, 1)),           # 6 components
    "unequal-s2": (2, 7, 10, 9, (1, 4, 2), 3, 2, 5, 3, (2, 2), (2, 1, 0, 3)),
    "zf-like-5x5s2": (1, 4, 13, 15, (2, 2), 2, 2, 5, 5, (2, 2), (0, 0, 0, 0)),
    "3x3s2": (2, 5, 11, 10, (3, 2), 1, 3, 3, 3, (2, 2), (1, 1, 1, 1)),
    "1x1": (2, 3, 6, 5, (3,), 1, 5, 1, 1, (1, 1), (0, 0, 0, 0)),                       # the generic column
    "wide-padding": (1, 2, 4, 5, (1, 1), 1, 1, 2, 2, (1, 1), (3, 0, 0, 3)),            # all-zero windows
    "stride3x1": (1, 5, 11, 8, (2, 3), 2, 1, 3, 2, (3, 1), (0, 1, 2, 0)),
    "7x7-odd-groups": (2, 9, 12, 13, (3, 1, 5), 2, 3, 7, 7, (1, 2), (3, 3, 2, 1)),   # 6 comps: a run across h
    "7x7s2": (1, 4, 17, 9, (2, 2), 2, 2, 7, 4, (2, 1), (3, 2, 1, 2)),
    "7x1-many-channels": (1, 12, 9, 7, (12,), 1, 4, 7, 1, (1, 1), (3, 3, 0, 0)),
    # tall enough for columns with no padding row (the loads held in registers) beside border columns
    "tall-3x3": (2, 3, 24, 10, (1, 2), 1, 3, 3, 3, (1, 1), (1, 1, 1, 1)),
    "tall-5x5s2": (1, 4, 40, 12, (2, 2), 2, 2, 5, 5, (2, 2), (1, 1, 1, 1)),
    "tall-5x5s1": (1, 3, 30, 9, (3,), 1, 5, 5, 3, (1, 1), (2, 2, 0, 1)),
    "tall-7x7s2": (1, 2, 52, 11, (1, 1), 1, 3, 7, 7, (2, 2), (0, 3, 3, 3)),
    "tall-3x3s2": (1, 4, 41, 7, (1, 3), 2, 1, 3, 3, (2, 1), (1, 0, 1, 1)),
}


def cp_reference(x, in_perm, in_off, reduce, vert, hor, stride, pad):
    """Z (NH*G*K, N*P): row (h*G + g)*K + k is component (g, h, k), reduced then filtered, by definition."""
    N = x.shape[0]
    G, NH, K, _ = vert.shape
    rows = []
    for h in range(NH):
        for g in range(G):
            for k in range(K):
                r = np.zeros((N,) + x.shape[2:])
                for j in range(in_off[g], in_off[g + 1]):
                    r += float(reduce[j, h, k]) * x[:, in_perm[j]].astype(np.float64)
                rows.append(sep_conv(r, vert[g, h, k], hor[g, h, k], stride, pad).reshape(-1))
    return np.stack(rows)


def cp_launch(launch, N, OH, OW, HK):
    """(thread order, TW, TH, KC, threads, grid z) of bic_cp_front, chosen here: the whole output in one tile of
    at most 32 x 8 with a thread a pixel, 4 components a block (a remainder chunk when HK is not a multiple) and
    z = N; or 3 x 2 tiles, 3 components and 7 threads (fewer than a tile's pixels and than its (component,
    column) pairs, so both phases loop) in reverse order with z = 1 (the image loop)."""
    if launch == "forward-full":
        TW, TH = min(OW, 32), min(OH, TH_MAX)
        return "forward", TW, TH, min(4, HK), TW * TH, N
    return "reverse", 3, 2, min(3, HK), 7, 1


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("case", sorted(CP_CASES))
def test_cp_front(bic_module, rng, dtype, launch, case):
    N, C, H, W, sizes, NH, K, X, Y, stride, pad = CP_CASES[case]
    G = len(sizes)
    in_perm = rng.permutation(C)
    in_off = np.concatenate([[0], np.cumsum(sizes)])
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    reduce = rng.standard_normal((C, NH, K)).astype(dtype)
    vert = rng.standard_normal((G, NH, K, X)).astype(dtype)
    hor = rng.standard_normal((G, NH, K, Y)).astype(dtype)
    OH, OW = out_len(H, X, stride[0], pad[0], pad[1]), out_len(W, Y, stride[1], pad[2], pad[3])
    order, TW, TH, KC, threads, gz = cp_launch(launch, N, OH, OW, NH * K)
    smem = cp_smem(X, Y, TW, TH, KC, stride, max(sizes), dtype.itemsize)
    tiles_w = -(-OW // TW)
    kchunks = -(-NH * K // KC)
    z = np.full((NH * G * K, N * OH * OW), np.nan, dtype)
    args = (x, in_perm.astype(i32), in_off.astype(i32), reduce, vert, hor, z,
            *map(i32, (N, C, H, W, G, NH, K, X, Y, *stride, pad[0], pad[2], OH, OW, TW, TH, KC, tiles_w, kchunks)))
    kernel(bic_module, cp_front_name(X, stride[0]), dtype)((-(-OH // TH) * tiles_w, G * kchunks, gz), (threads,), args,
                                                           shared_mem=smem, order=order)
    check(z, cp_reference(x, in_perm, in_off, reduce, vert, hor, stride, pad), dtype, max(sizes) * X * Y)


def cp_smem(X, Y, TW, TH, KC, stride, cg_max, item):
    """bic_cp_front's dynamic shared memory, from the layout described in _bicluster.cu: spatial taps, reduction
    weights and the vertical pass's tiles (reals, rounded to an even count), then 8-byte offsets."""
    TIW = (TW - 1) * stride[1] + Y
    reals = KC * (X + Y) + KC * cg_max + KC * TH * TIW
    return (reals + reals % 2) * item + 8 * cg_max


def test_cp_tiling():
    """ops_bicluster's geometry for bic_cp_front: the kernel's layout (checked independently), even tiles, the
    block's threads used by phase A, and the budget."""
    for X, Y, SH, SW, item, cg, OH, OW, HK in [(5, 5, 2, 2, 4, 2, 26, 26, 24), (3, 3, 1, 1, 8, 7, 13, 13, 12),
                                               (5, 5, 2, 2, 8, 1, 55, 55, 8), (7, 1, 1, 1, 4, 96, 40, 3, 5),
                                               (1, 1, 1, 1, 4, 3, 1, 200, 1)]:
        TW, TH, KC, smem = ops_bicluster.cp_tiling(X, Y, SH, SW, item, cg, OH, OW, HK)
        assert smem == cp_smem(X, Y, TW, TH, KC, (SH, SW), cg, item) <= ops_bicluster.CP_SMEM_BUDGET
        assert TW <= 32 and TH <= TH_MAX and TW * TH <= 256 and 1 <= KC <= HK
        assert -(-OW // TW) * TW - OW < -(-OW // TW) and -(-OH // TH) * TH - OH < -(-OH // TH)  # evenly split
        TIW = (TW - 1) * SW + Y
        assert KC * TIW <= TW * TH or KC == 1
    # ZF conv2 (26 x 26 outputs, 5x5 stride 2, G = 48 groups of 2, K = 12, NH = 2): one tile of 26 columns, 4 of 7
    # rows (4 x 8 would leave 6 rows idle), 3 components: 165 (component, column) pairs for 182 threads
    assert ops_bicluster.cp_tiling(5, 5, 2, 2, 4, 2, 26, 26, 24)[:3] == (26, 7, 3)
    assert ops_bicluster.cp_tiling(31, 31, 1, 1, 8, 4096, 64, 64, 8) is None        # too large: the fallback


# --- bic_gather and bic_scatter ----------------------------------------------------------------------------------

@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (1, 1, 7, 1), (3, 4, 2, 5)])
def test_gather(bic_module, rng, dtype, launch, shape):
    m, C, H, W = shape
    x = rng.standard_normal(shape).astype(dtype)
    perm = rng.permutation(C)
    xg = np.full((C, m * H * W), np.nan, dtype)
    ref = np.stack([x[:, perm[j]].reshape(-1) for j in range(C)])
    order, grid, block = ("forward", -(-xg.size // 256), 256) if launch == "forward-full" else ("reverse", 2, 32)
    kernel(bic_module, "bic_gather", dtype)((grid,), (block,), (x, perm.astype(i32), xg, *map(i32, (m, C, H * W))),
                                            order=order)
    np.testing.assert_array_equal(xg, ref)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("launch", LAUNCHES)
def test_scatter(bic_module, rng, dtype, launch, with_bias):
    m, F, P, o0, Fh = 3, 9, 7, 2, 4
    out_perm = rng.permutation(F)
    r = rng.standard_normal((Fh, m * P)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = np.full((m, F, P), np.nan, dtype)
    untouched = np.setdiff1d(np.arange(F), out_perm[o0:o0 + Fh])
    order, grid, block = ("forward", -(-r.size // 256), 256) if launch == "forward-full" else ("reverse", 2, 32)
    kernel(bic_module, "bic_scatter", dtype)((grid,), (block,), (r, out_perm.astype(i32), b if with_bias else r, y,
                                                                 *map(i32, (Fh, m, P, F, o0, with_bias))), order=order)
    for f in range(Fh):
        fo = out_perm[o0 + f]
        want = r[f].reshape(m, P) + (b[fo] if with_bias else 0)
        np.testing.assert_array_equal(y[:, fo], want)
    assert np.isnan(y[:, untouched]).all(), "channels of other output groups were written"


# --- bic_expand ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("sizes,m,P,GK", [((3, 40, 5), 2, 21, 7), ((33,), 1, 70, 37), ((1, 2), 3, 5, 16)])
def test_expand(bic_module, rng, dtype, order, sizes, m, P, GK, with_bias):
    """Every output group's expansion and scatter in one launch, against loops over the definition: groups of
    unequal size (a group of 40 rows spans two tiles of 32, a group of 1 leaves whole blocks with nothing to do),
    columns and reduction rows that are not multiples of the 32 x 32 x 16 tile."""
    NH, F = len(sizes), sum(sizes)
    out_off = np.concatenate([[0], np.cumsum(sizes)]).astype(i32)
    out_perm = rng.permutation(F).astype(i32)
    z = rng.standard_normal((NH, GK, m * P)).astype(dtype)
    expand = rng.standard_normal((F, GK)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = np.full((m, F, P), np.nan, dtype)
    grid = (-(-(m * P) // 32), -(-max(sizes) // 32), NH)
    kernel(bic_module, "bic_expand", dtype)(grid, (64,), (z, expand, out_off, out_perm, b if with_bias else z, y,
                                                          *map(i32, (m, P, F, GK, with_bias))), order=order)
    want = np.empty((m, F, P))
    for h in range(NH):
        for o in range(out_off[h], out_off[h + 1]):
            for n in range(m):
                for p in range(P):
                    v = sum(float(expand[o, q]) * float(z[h, q, n * P + p]) for q in range(GK))
                    want[n, out_perm[o], p] = v + (float(b[out_perm[o]]) if with_bias else 0.0)
    check(y, want, dtype, GK)


# --- bic_reduce ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("sizes,m,HW,HK1", [((3, 40, 5), 2, 21, 7), ((1, 2), 3, 5, 33), ((17,), 1, 70, 38)])
def test_reduce(bic_module, rng, dtype, order, sizes, m, HW, HK1):
    """The gather and every input group's reduction in one launch, against loops over the definition: groups of
    unequal size (40 channels take three steps of 16, a group of 1 one partial step), HK1 rows that span two tiles
    of 32, columns that are not multiples of 32 and cross from one image to the next."""
    G, C = len(sizes), sum(sizes)
    in_off = np.concatenate([[0], np.cumsum(sizes)]).astype(i32)
    in_perm = rng.permutation(C).astype(i32)
    x = rng.standard_normal((m, C, HW)).astype(dtype)
    reduce = rng.standard_normal((C, HK1)).astype(dtype)
    z1 = np.full((G * HK1, m * HW), np.nan, dtype)
    grid = (-(-(m * HW) // 32), -(-HK1 // 32), G)
    kernel(bic_module, "bic_reduce", dtype)(grid, (64,), (x, in_perm, in_off, reduce, z1,
                                                          *map(i32, (m, C, HW, HK1))), order=order)
    want = np.empty((G * HK1, m * HW))
    for g in range(G):
        for r in range(HK1):
            for n in range(m):
                for s in range(HW):
                    want[g * HK1 + r, n * HW + s] = sum(float(reduce[j, r]) * float(x[n, in_perm[j], s])
                                                        for j in range(in_off[g], in_off[g + 1]))
    check(z1, want, dtype, max(sizes))


# --- bic_svd_spatial -----------------------------------------------------------------------------------------------

SVD_CASES = {
    # name: (m, G, NH, K1, K2, H, W, X, Y, stride, padding, CC (K1 channels per shared-memory chunk))
    "3x3": (2, 2, 2, 3, 5, 7, 8, 3, 3, (1, 1), (1, 1, 1, 1), 3),
    "chunks-two-filter-blocks": (1, 1, 3, 5, 20, 9, 6, 2, 3, (2, 1), (1, 0, 2, 1), 2),      # K1 = 2 + 2 + 1
    "1x1-stride2": (2, 3, 1, 2, 16, 5, 5, 1, 1, (2, 2), (0, 0, 0, 0), 1),
    "wide-padding": (1, 1, 1, 1, 3, 4, 5, 2, 2, (1, 1), (3, 0, 0, 3), 1),
}


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("case", sorted(SVD_CASES))
@pytest.mark.parametrize("splits,split_entry", [(1, False), (1, True), (2, True), (3, True)],
                         ids=["bic_svd_spatial", "split1", "split2", "split3"])
def test_svd_spatial(bic_module, rng, dtype, launch, case, splits, split_entry):
    """16 filters a block; bic_svd_spatial_split with the K1 channels in 1-3 splits along grid z, each written to its
    own rows of Z (ceil(K1 / splits) channels a split, the last ones short or empty)."""
    m, G, NH, K1, K2, H, W, X, Y, stride, pad, CC = SVD_CASES[case]
    z1 = rng.standard_normal((G * NH * K1, m * H * W)).astype(dtype)
    sp = rng.standard_normal((G, NH, K2, K1, X, Y)).astype(dtype)
    OH, OW = out_len(H, X, stride[0], pad[0], pad[1]), out_len(W, Y, stride[1], pad[2], pad[3])
    P = OH * OW
    per = -(-K1 // splits)
    ref = np.zeros((NH * G * splits * K2, m * P))
    for g in range(G):
        for h in range(NH):
            rows = z1[(g * NH + h) * K1:(g * NH + h + 1) * K1].reshape(K1, m, H, W).transpose(1, 0, 2, 3)
            for s in range(splits):
                c = slice(min(K1, s * per), min(K1, (s + 1) * per))
                if c.start == c.stop:
                    continue                                                           # an empty split: zeros
                out = conv2d_einsum(rows[:, c], sp[g, h][:, c], None, stride=stride, padding=pad)  # (m, K2, OH, OW)
                r0 = ((h * G + g) * splits + s) * K2
                ref[r0:r0 + K2] = out.transpose(1, 0, 2, 3).reshape(K2, m * P)
    z = np.full(ref.shape, np.nan, dtype)
    total = m * P
    if launch == "forward-full":
        order, grid, block = "forward", (-(-total // 256), -(-K2 // FT), G * NH * splits), (256,)
    else:
        order, grid, block = "reverse", (2, -(-K2 // FT), G * NH * splits), (32,)
    ints = (m, G, NH, K1, K2, H, W, X, Y, *stride, pad[0], pad[2], OH, OW, CC) + ((splits,) if split_entry else ())
    args = (z1, sp, z, *map(i32, ints))
    name = "bic_svd_spatial_split" if split_entry else "bic_svd_spatial"
    kernel(bic_module, name, dtype)(grid, block, args, shared_mem=CC * X * Y * FT * dtype.itemsize, order=order)
    check(z, ref, dtype, K1 * X * Y)


# --- bic_shared_filter and bic_shared_combine ----------------------------------------------------------------------

SHARED_CASES = {
    # name: (N, C, H, W, input group sizes, NH, K, S, X, Y, stride, padding)
    "equal-3x3": (2, 6, 9, 10, (2, 2, 2), 2, 3, 4, 3, 3, (1, 1), (1, 1, 1, 1)),
    "unequal-s2": (2, 7, 11, 9, (1, 4, 2), 2, 2, 3, 5, 3, (2, 2), (2, 1, 0, 3)),
    "one-filter": (1, 3, 6, 7, (3,), 1, 4, 1, 2, 4, (1, 2), (0, 0, 1, 1)),
    "wide-padding": (1, 2, 4, 5, (1, 1), 1, 2, 2, 2, 2, (1, 1), (3, 0, 0, 3)),
}


def shared_lists(assign, in_off):
    """Per group the shared filters used (ascending), each component's slot in that list, and the Q row offsets,
    by loops (written independently of ops_bicluster.shared_launch_plan)."""
    G = assign.shape[0]
    used = [sorted(set(int(s) for s in assign[g].ravel())) for g in range(G)]
    slot = np.array([[[used[g].index(int(assign[g, h, k])) for k in range(assign.shape[2])]
                      for h in range(assign.shape[1])] for g in range(G)])
    used_ptr = np.concatenate([[0], np.cumsum([len(u) for u in used])])
    qoff = np.concatenate([[0], np.cumsum([(in_off[g + 1] - in_off[g]) * len(used[g]) for g in range(G)])])
    return used, slot, used_ptr, qoff


def shared_q_reference(x, in_perm, in_off, used, vert, hor, stride, pad):
    rows = []
    for g in range(len(used)):
        for j in range(in_off[g], in_off[g + 1]):
            for s in used[g]:
                rows.append(sep_conv(x[:, in_perm[j]].astype(np.float64), vert[s], hor[s], stride, pad).reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("case", sorted(SHARED_CASES))
def test_shared_filter_and_combine(bic_module, rng, dtype, launch, case):
    N, C, H, W, sizes, NH, K, S, X, Y, stride, pad = SHARED_CASES[case]
    G = len(sizes)
    in_perm = rng.permutation(C)
    in_off = np.concatenate([[0], np.cumsum(sizes)])
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    reduce = rng.standard_normal((C, NH, K)).astype(dtype)
    assign = rng.integers(0, S, size=(G, NH, K))
    vert, hor = rng.standard_normal((S, X)).astype(dtype), rng.standard_normal((S, Y)).astype(dtype)
    used, slot, used_ptr, qoff = shared_lists(assign, in_off)
    OH, OW = out_len(H, X, stride[0], pad[0], pad[1]), out_len(W, Y, stride[1], pad[2], pad[3])
    P = OH * OW

    def smem_of(TW, TH):
        return (((TH - 1) * stride[0] + X) * ((TW - 1) * stride[1] + Y) + TH * ((TW - 1) * stride[1] + Y)) \
            * dtype.itemsize
    order, TW, TH, gz, smem = tile_launch(launch, N, smem_of)
    tiles_w = -(-OW // TW)
    q_ref = shared_q_reference(x, in_perm, in_off, used, vert, hor, stride, pad)
    q = np.full(q_ref.shape, np.nan, dtype)
    ints = [a.astype(i32) for a in (in_perm, group_of(in_off), in_off, used_ptr, np.concatenate(used), qoff)]
    args = (x, *ints, vert, hor, q, *map(i32, (N, C, H, W, X, Y, *stride, pad[0], pad[2], OH, OW, tiles_w)))
    kernel(bic_module, "bic_shared_filter", dtype)((-(-OH // TH) * tiles_w, C, gz), (TW, TH), args,
                                                   shared_mem=smem, order=order)
    check(q, q_ref, dtype, X * Y)

    # the combination, of the reference maps (in the dtype)
    q_in = q_ref.astype(dtype)
    z_ref = np.zeros((NH * G * K, N * P))
    for h in range(NH):
        for g in range(G):
            U = len(used[g])
            for k in range(K):
                for jj, j in enumerate(range(in_off[g], in_off[g + 1])):
                    z_ref[(h * G + g) * K + k] += float(reduce[j, h, k]) * q_in[qoff[g] + jj * U + slot[g, h, k]]
    z = np.full(z_ref.shape, np.nan, dtype)
    grid, block = ((-(-z.size // 256),), (256,)) if launch == "forward-full" else ((2,), (32,))
    kernel(bic_module, "bic_shared_combine", dtype)(
        grid, block, (q_in, reduce, slot.astype(i32), in_off.astype(i32), used_ptr.astype(i32), qoff.astype(i32), z,
                      *map(i32, (N, P, G, NH, K))), order=order)
    check(z, z_ref, dtype, max(sizes))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("in_sizes,out_sizes,K,S,m,P", [((1, 4, 2), (3, 40, 5), 3, 4, 2, 21),
                                                         ((2, 2), (33,), 5, 2, 1, 70), ((3,), (1, 2), 2, 3, 3, 5)])
def test_expand_shared(bic_module, rng, dtype, order, in_sizes, out_sizes, K, S, m, P, with_bias):
    """The shared separable form's combination and expansion in one launch, against loops over the definitions (the
    combination as for bic_shared_combine, then the expansion as for bic_expand): unequal input groups with different
    numbers of used filters, output groups of 40 and 33 rows (two tiles of 32) and of 1 (whole blocks idle), GK and
    columns that are not multiples of the 32 x 32 x 16 tile."""
    G, NH, C, F = len(in_sizes), len(out_sizes), sum(in_sizes), sum(out_sizes)
    in_off = np.concatenate([[0], np.cumsum(in_sizes)])
    out_off = np.concatenate([[0], np.cumsum(out_sizes)]).astype(i32)
    out_perm = rng.permutation(F).astype(i32)
    assign = rng.integers(0, S, size=(G, NH, K))
    used, slot, used_ptr, qoff = shared_lists(assign, in_off)
    q = rng.standard_normal((int(qoff[-1]), m * P)).astype(dtype)
    reduce = rng.standard_normal((C, NH, K)).astype(dtype)
    expand = rng.standard_normal((F, G, K)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = np.full((m, F, P), np.nan, dtype)
    grid = (-(-(m * P) // 32), -(-max(out_sizes) // 32), NH)
    ints = [a.astype(i32) for a in (slot, in_off, used_ptr, qoff)]
    kernel(bic_module, "bic_expand_shared", dtype)(
        grid, (64,), (q, reduce, *ints, expand, out_off, out_perm, b if with_bias else q, y,
                      *map(i32, (m, P, F, G, NH, K, with_bias))), order=order)
    want = np.empty((m, F, P))
    for h in range(NH):
        z = np.zeros((G, K, m * P))
        for g in range(G):
            U = len(used[g])
            for k in range(K):
                for jj, j in enumerate(range(in_off[g], in_off[g + 1])):
                    z[g, k] += float(reduce[j, h, k]) * q[qoff[g] + jj * U + slot[g, h, k]].astype(np.float64)
        for o in range(out_off[h], out_off[h + 1]):
            row = sum(float(expand[o, g, k]) * z[g, k] for g in range(G) for k in range(K))
            want[:, out_perm[o]] = row.reshape(m, P) + (float(b[out_perm[o]]) if with_bias else 0.0)
    check(y, want, dtype, G * K * max(in_sizes))


def test_shared_launch_plan_matches_independent_lists(rng):
    in_off = np.array([0, 1, 5, 7])
    assign = rng.integers(0, 6, size=(3, 2, 4))
    plan = ops_bicluster.shared_launch_plan(assign, in_off, 6)
    used, slot, used_ptr, qoff = shared_lists(assign, in_off)
    np.testing.assert_array_equal(plan.used_ptr, used_ptr)
    np.testing.assert_array_equal(plan.used_filter, np.concatenate(used))
    np.testing.assert_array_equal(plan.slot, slot)
    np.testing.assert_array_equal(plan.qoff, qoff)
    np.testing.assert_array_equal(plan.chan_group, [0, 1, 1, 1, 1, 2, 2])
    assert all(a.dtype == np.int32 and not a.flags.writeable for a in plan)
    assert ops_bicluster.shared_launch_plan(assign.copy(), in_off, 6) is plan        # memoised by content
