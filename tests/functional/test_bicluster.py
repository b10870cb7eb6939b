"""Factored execution of biclustered convs (CP, SVD, shared separable) against a plain conv with the kernel
rebuilt (independently, in this file) from the same factors; CPU kernels and the composed (GPU) path."""
import numpy as np
import pytest

from npconv.functional import bicluster as FB
from npconv.functional.bicluster import (bicluster_conv2d, bicluster_cp_conv2d, bicluster_svd_conv2d,
                                         shared_separable_conv2d)
from tests.reference import tolerance
from tests.reference import conv2d_einsum, conv2d_naive

DTYPES = [np.float32, np.float64]
GEOMS = [  # stride, padding (top, bottom, left, right)
    ((1, 1), (0, 0, 0, 0)),
    ((2, 2), (1, 1, 1, 1)),
    ((2, 3), (2, 0, 1, 3)),
    ((3, 1), (0, 1, 2, 0)),
]


def _groups(rng, n, sizes):
    perm = rng.permutation(n).astype(np.int64)
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    assert off[-1] == n
    return perm, off


def _cp_factors(rng, C, F, X, Y, in_sizes, out_sizes, K, dtype):
    G, H = len(in_sizes), len(out_sizes)
    in_perm, in_off = _groups(rng, C, in_sizes)
    out_perm, out_off = _groups(rng, F, out_sizes)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return (in_perm, in_off, r(C, H, K), r(G, H, K, X), r(G, H, K, Y), r(F, G, K), out_perm, out_off)


def _svd_factors(rng, C, F, X, Y, in_sizes, out_sizes, K1, K2, dtype):
    G, H = len(in_sizes), len(out_sizes)
    in_perm, in_off = _groups(rng, C, in_sizes)
    out_perm, out_off = _groups(rng, F, out_sizes)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return (in_perm, in_off, r(C, H, K1), r(G, H, K2, K1, X, Y), r(F, G, K2), out_perm, out_off)


def _band_rows(OH, bands):
    """Rows a band for the fused layers' band tests: one band an image, two, bands of one row, a short last band."""
    return {"one": OH, "two": -(-OH // 2), "rows1": 1, "uneven": max(1, OH - 1)}[bands]


def _shared_factors(rng, C, F, X, Y, in_sizes, out_sizes, K, S, dtype):
    G, H = len(in_sizes), len(out_sizes)
    in_perm, in_off = _groups(rng, C, in_sizes)
    out_perm, out_off = _groups(rng, F, out_sizes)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    assign = rng.integers(0, S, size=(G, H, K)).astype(np.int64)
    return (in_perm, in_off, r(C, H, K), assign, r(S, X), r(S, Y), r(F, G, K), out_perm, out_off)


def _dense_kernel(kind, f):
    """The dense kernel the factors stand for, built entry by entry from the definitions."""
    if kind == "shared":
        in_perm, in_off, red, assign, vs, hs, exp, out_perm, out_off = f
        X, Y = vs.shape[1], hs.shape[1]
    elif kind == "cp":
        in_perm, in_off, red, vert, hor, exp, out_perm, out_off = f
        X, Y = vert.shape[3], hor.shape[3]
    else:
        in_perm, in_off, red, sp, exp, out_perm, out_off = f
        X, Y = sp.shape[4], sp.shape[5]
    C, F = in_perm.size, out_perm.size
    W = np.zeros((F, C, X, Y))
    in_g = np.repeat(np.arange(in_off.size - 1), np.diff(in_off))
    out_g = np.repeat(np.arange(out_off.size - 1), np.diff(out_off))
    red, exp = red.astype(np.float64), exp.astype(np.float64)
    for i in range(F):
        for j in range(C):
            g, h = in_g[j], out_g[i]
            if kind == "cp":
                blk = np.einsum("k,kx,ky->xy", exp[i, g] * red[j, h], vert[g, h].astype(np.float64),
                                hor[g, h].astype(np.float64))
            elif kind == "svd":
                blk = np.einsum("m,mkxy,k->xy", exp[i, g], sp[g, h].astype(np.float64), red[j, h])
            else:
                s = assign[g, h]
                blk = np.einsum("k,kx,ky->xy", exp[i, g] * red[j, h], vs[s].astype(np.float64),
                                hs[s].astype(np.float64))
            W[out_perm[i], in_perm[j]] = blk
    return W


def _run(kind, x, f, b, stride, padding):
    if kind == "cp":
        return bicluster_cp_conv2d(x, *f, b, stride=stride, padding=padding)
    if kind == "svd":
        return bicluster_svd_conv2d(x, *f, b, stride=stride, padding=padding)
    return shared_separable_conv2d(x, *f, b, stride=stride, padding=padding)


def _make(kind, rng, dtype, C=6, F=8, X=3, Y=4, in_sizes=(2, 2, 2), out_sizes=(4, 4)):
    if kind == "cp":
        return _cp_factors(rng, C, F, X, Y, in_sizes, out_sizes, 3, dtype)
    if kind == "svd":
        return _svd_factors(rng, C, F, X, Y, in_sizes, out_sizes, 2, 3, dtype)
    return _shared_factors(rng, C, F, X, Y, in_sizes, out_sizes, 3, 2, dtype)


KINDS = ["cp", "svd", "shared"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride,padding", GEOMS)
@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "blas"])
def test_matches_conv_with_rebuilt_kernel(rng, monkeypatch, kind, dtype, stride, padding, microkernel):
    # the GEMMs both ways: npconv's micro-kernel (where the CPU has one) and BLAS
    monkeypatch.setattr(FB, "USE_MICROKERNEL", microkernel)
    f = _make(kind, rng, dtype)
    x = rng.standard_normal((2, 6, 9, 11)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    y = _run(kind, x, f, b, stride, padding)
    ref = conv2d_naive(x, _dense_kernel(kind, f), b, stride, padding)
    assert y.dtype == dtype and y.shape == ref.shape
    np.testing.assert_allclose(y, ref, *tolerance(dtype))


@pytest.mark.parametrize("K1,K2", [(2, 3), (4, 8), (5, 16), (3, 9)])
def test_svd_ranks_around_gemm_row_padding(rng, K1, K2):
    """The SVD path pads its GEMM operands' rows (H*K1 per group, K2 per block) to a multiple of 8 with zeros:
    ranks on both sides of that boundary, with uneven groups, still give the rebuilt kernel's conv."""
    f = _svd_factors(rng, 7, 10, 3, 3, (3, 4), (4, 6), K1, K2, np.float32)
    x = rng.standard_normal((3, 7, 9, 10)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    y = bicluster_svd_conv2d(x, *f, b, stride=(2, 1), padding=1)
    ref = conv2d_einsum(x, _dense_kernel("svd", f), b, (2, 1), (1, 1, 1, 1))
    np.testing.assert_allclose(y, ref, *tolerance(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("X,Y,K", [(5, 5, 1), (1, 7, 4), (7, 2, 5), (2, 1, 3), (4, 6, 2)])
@pytest.mark.parametrize("stride,padding", [((1, 1), (0, 0, 0, 0)), ((2, 2), (2, 2, 2, 2)),
                                            ((2, 3), (1, 0, 0, 2))])
@pytest.mark.parametrize("gemm_front", [True, False], ids=["gemm-front", "loop-front"])
def test_cp_tap_counts_and_component_quads(rng, monkeypatch, dtype, X, Y, K, stride, padding, gemm_front):
    """The CPU CP front end takes its components 4 at a time (a short last quad when H*K is not a multiple of 4)
    and its horizontal taps in sweeps of 5, 3 and 1: tap counts 1-7 and K from 1 to 5, with uneven groups; with the
    folded groups' horizontal pass on the implicit GEMM (where the CPU has the 12-row tile) and without it."""
    monkeypatch.setattr(FB, "USE_CP_GEMM_FRONT", gemm_front)
    f = _cp_factors(rng, 6, 8, X, Y, (1, 2, 3), (3, 5), K, dtype)
    x = rng.standard_normal((3, 6, 13, 17)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    y = bicluster_cp_conv2d(x, *f, b, stride=stride, padding=padding)
    ref = conv2d_naive(x, _dense_kernel("cp", f), b, stride, padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("case", [
    # C, F, X, Y, input groups, output groups, K, N, input H x W, stride, padding
    (6, 10, 5, 5, (2, 1, 3), (4, 6), 3, 2, (13, 17), (2, 2), (1, 2, 0, 1)),     # 6 components: the 8-row tile
    (4, 8, 3, 5, (2, 2), (3, 5), 8, 1, (9, 80), (1, 1), (1, 1, 2, 2)),          # 16 = 12 + 4; 80 columns: 3 runs
    (4, 9, 3, 4, (1, 2, 1), (9,), 13, 1, (11, 30), (3, 1), (0, 2, 1, 0)),       # 13 = 12 + 1, one output group
    (5, 12, 2, 3, (2, 3), (4, 4, 4), 8, 3, (7, 9), (1, 2), (1, 1, 1, 1)),       # 24: two whole row blocks; 5 x 5
    (8, 6, 3, 3, (2, 2, 2, 2), (3, 3), 8, 2, (9, 12), (2, 1), (0, 0, 0, 0)),    # 16 in one job; 5 x 16 planes
])
@pytest.mark.parametrize("gemm_front", [True, False], ids=["gemm-front", "loop-front"])
def test_cp_gemm_front_row_blocks_and_runs(rng, monkeypatch, dtype, own, case, gemm_front):
    """The GEMM front end (the reduction folded into the horizontal taps, forced) on its row blocks (6, 16, 13 and 24
    components: the 8-, 12- and 4-row tiles, one block or two, in one job or split among jobs when images x groups
    are few), its accumulator rows (a row phase of 5 x 16 values padded to whole panels of 32) and its vertical
    pass's runs (a row of 76 outputs in runs of 32 or 16; rows narrower than a run, whose last runs go through the
    scratch run), packing its own groups (then one image a chunk: the jobs fetch the next job's input planes ahead,
    from images past the first chunk) or reading the chunk's packed input. The loop front end (4 components at a
    time) on the same cases: its vertical pass has the same runs."""
    from npconv.kernels.cpu import bicluster as KB
    monkeypatch.setattr(KB, "cp_reduce_first", lambda *a: False)
    monkeypatch.setattr(FB, "_cp_own_pack", lambda *a: own)
    if own:
        monkeypatch.setattr(FB, "_TARGET_COLUMNS", 1)
    monkeypatch.setattr(FB, "USE_CP_GEMM_FRONT", gemm_front)
    monkeypatch.setattr(FB, "USE_CP_FUSED", False)
    C, F, X, Y, ins, outs, K, N, (Hi, Wi), stride, pad = case
    f = _cp_factors(rng, C, F, X, Y, ins, outs, K, dtype)
    x = rng.standard_normal((N, C, Hi, Wi)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = bicluster_cp_conv2d(x, *f, b, stride=stride, padding=pad)
    ref = conv2d_einsum(x, _dense_kernel("cp", f), b, stride, pad)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bands", ["one", "two", "rows1", "uneven"])
@pytest.mark.parametrize("case", [
    # C, F, X, Y, input groups, output groups, K, N, input H x W, stride, padding
    (6, 10, 5, 5, (2, 1, 3), (4, 6), 3, 2, (13, 17), (2, 2), (1, 2, 0, 1)),     # 6 components; F_h 4 and 6
    (4, 27, 3, 5, (2, 2), (3, 24), 8, 1, (9, 80), (1, 1), (1, 1, 2, 2)),        # 16 components; F_h 3 and 24
    (4, 9, 3, 4, (1, 2, 1), (9,), 13, 3, (11, 51), (3, 1), (0, 2, 1, 0)),       # 13 components, one output group
    (8, 26, 3, 3, (2, 2, 2, 2), (13, 13), 8, 2, (9, 59), (2, 1), (0, 0, 0, 0)),  # F_h 13 = 12 + 1
])
def test_cp_fused_bands(rng, monkeypatch, dtype, bands, case):
    """The fused CP layer (front end and expansion per band of output rows, ``kernels/cpu/cp_fused.py``; where the
    CPU has the micro-kernel's 12-row tile, else the unfused path) against the rebuilt kernel's conv: one band an
    image, two, bands of one row, and a last band shorter than the others; with and without the bias; output
    groups of 3 to 24 channels (the expansion's 4-, 8- and 12-row tiles, and its one-vector tile where a band's
    last panel is at most half a panel: rows of 49 and 57 outputs leave 17 and 9 columns, one past half a panel of
    float32 and of float64), into a given ``out`` too."""
    from npconv.kernels.cpu import bicluster as KB
    monkeypatch.setattr(KB, "cp_reduce_first", lambda *a: False)
    C, F, X, Y, ins, outs, K, N, (Hi, Wi), stride, pad = case
    f = _cp_factors(rng, C, F, X, Y, ins, outs, K, dtype)
    x = rng.standard_normal((N, C, Hi, Wi)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    OH = (Hi + pad[0] + pad[1] - X) // stride[0] + 1
    monkeypatch.setattr(FB, "_fused_band_rows", lambda *a: _band_rows(OH, bands))
    ref = conv2d_einsum(x, _dense_kernel("cp", f), b, stride, pad)
    y = bicluster_cp_conv2d(x, *f, b, stride=stride, padding=pad)
    np.testing.assert_allclose(y, ref, *tolerance(dtype))
    out = np.full(ref.shape, np.nan, dtype)
    bicluster_cp_conv2d(x, *f, None, stride=stride, padding=pad, out=out)
    np.testing.assert_allclose(out, conv2d_einsum(x, _dense_kernel("cp", f), None, stride, pad), *tolerance(dtype))


def test_fused_row_pads_to_64_bytes_only_when_it_costs_little():
    """The fused CP and shared layers' packed rows: rounded up to 64 bytes where that adds at most a quarter (ZF
    conv2's 28 -> 32 values, a 13 x 13 map's 15 -> 16), unpadded where it would add more (the CIFAR network's conv2,
    20 -> 32); the unpadded rows are exercised by ``test_cp_fused_bands`` (its first case: rows of 9 values)."""
    assert FB._fused_row(28, 4) == 32 and FB._fused_row(15, 4) == 16 and FB._fused_row(32, 4) == 32
    assert FB._fused_row(20, 4) == 20 and FB._fused_row(24, 4) == 24 and FB._fused_row(10, 4) == 10
    assert FB._fused_row(7, 8) == 8 and FB._fused_row(5, 8) == 5      # float64 rows: 8 values to 64 bytes


@pytest.mark.parametrize("nth", [1, 2, 3, 4])
def test_fused_band_rows(nth):
    """The fused CP layer's bands cover the output rows in at most ``OH`` bands of at most ``OH`` rows; a batch that
    the threads share evenly runs whole images (one band), a batch of one image of enough rows is split for the
    threads."""
    for OH in (1, 2, 5, 26, 55):
        for N in (1, 2, 3, 5, 8, 128):
            br = FB._fused_band_rows(N, OH, nth)
            assert 1 <= br <= OH
            nbands = -(-OH // br)
            assert (nbands - 1) * br < OH
            if N % nth == 0:
                assert br == OH
            if N == 1 and OH >= 2 * nth:
                assert nbands >= nth


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cg, fused", [(2, True), (8, True), (16, True), (32, False)])
def test_cp_groups_fold_on_the_micro_kernel_up_to_the_bound(rng, monkeypatch, dtype, cg, fused):
    """Left to its rule, the CP layer folds its reduction into the horizontal taps and runs fused
    (``kernels/cpu/cp_fused.py``) for input groups of up to 20 channels at stride 1 and Y = 5 (the bundled CIFAR
    network's conv2 has 8), and reduces first (``cp_front``) past ``cg * Y > 4 * (cg + Y)``; both give the rebuilt
    kernel's conv. Without the micro-kernel's front end the earlier bound holds: groups of 3 or more reduce first."""
    from npconv.kernels.cpu import bicluster as KB
    from npconv.kernels.cpu import cp_fused as KU
    calls = {"fused": 0, "front": 0}

    def spy(name, fn):
        def wrapped(*a):
            calls[name] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(KU, "cp_fused", spy("fused", KU.cp_fused))
    monkeypatch.setattr(KB, "cp_front", spy("front", KB.cp_front))
    G = 2
    C = G * cg
    f = _cp_factors(rng, C, 12, 5, 5, (cg,) * G, (5, 7), 4, dtype)
    x = rng.standard_normal((2, C, 9, 11)).astype(dtype)
    b = rng.standard_normal(12).astype(dtype)
    y = bicluster_cp_conv2d(x, *f, b, stride=(1, 1), padding=(2, 2, 2, 2))
    np.testing.assert_allclose(y, conv2d_einsum(x, _dense_kernel("cp", f), b, (1, 1), (2, 2, 2, 2)), *tolerance(dtype))
    # the fused layer needs the micro-kernel's 12-row tile (AVX-512); without it the loop front end runs
    on_tile = FB._taps_ok(np.dtype(dtype))
    assert (calls["fused"], calls["front"]) == ((1, 0) if fused and on_tile else (0, 1))
    assert KB.cp_reduce_first(cg, 1, 5, True) is (not fused)
    assert KB.cp_reduce_first(cg, 1, 5, False) is (cg >= 3)


@pytest.mark.parametrize("reduce_first", [False, True])
@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("N", [1, 3])
def test_cp_front_end_packing_either_way(rng, monkeypatch, own, N, reduce_first):
    """The CP front end's jobs pack their own input group, or read a packing pass over the chunk; they fold the
    reduction into the horizontal taps, or reduce first: each way gives the rebuilt kernel's conv (forced; left to
    itself the first choice depends on the thread count, the second on the group size and the stride)."""
    from npconv.kernels.cpu import bicluster as KB
    monkeypatch.setattr(FB, "_cp_own_pack", lambda *a: own)
    monkeypatch.setattr(KB, "cp_reduce_first", lambda *a: reduce_first)
    f = _cp_factors(rng, 12, 10, 5, 5, (2, 1, 3, 2, 4), (4, 6), 3, np.float32)
    x = rng.standard_normal((N, 12, 15, 14)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    for stride, pad in (((2, 2), (2, 1, 0, 2)), ((1, 1), (2, 2, 2, 2)), ((2, 3), (1, 0, 0, 2))):
        y = bicluster_cp_conv2d(x, *f, b, stride=stride, padding=pad)
        ref = conv2d_naive(x, _dense_kernel("cp", f), b, stride, pad)
        np.testing.assert_allclose(y, ref, *tolerance(np.float32))


@pytest.mark.parametrize("own", [True, False])
def test_shared_front_end_packing_either_way(rng, monkeypatch, own):
    """The unfused shared front end's jobs pack their own input group, or read a packing pass over the chunk; either
    way, over chunks of one image and three geometries, the rebuilt kernel's conv."""
    monkeypatch.setattr(FB, "USE_SHARED_FUSED", False)
    monkeypatch.setattr(FB, "SHARED_OWN_PACK", own)
    monkeypatch.setattr(FB, "_TARGET_COLUMNS", 1)               # one image a chunk: n0 > 0
    f = _shared_factors(rng, 12, 10, 5, 5, (2, 1, 3, 2, 4), (4, 6), 3, 4, np.float32)
    x = rng.standard_normal((3, 12, 15, 14)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    for stride, pad in (((2, 2), (2, 1, 0, 2)), ((1, 1), (2, 2, 2, 2)), ((2, 3), (1, 0, 0, 2))):
        y = shared_separable_conv2d(x, *f, b, stride=stride, padding=pad)
        ref = conv2d_naive(x, _dense_kernel("shared", f), b, stride, pad)
        np.testing.assert_allclose(y, ref, *tolerance(np.float32))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,shape", [((1, 1), (7, 75)), ((1, 1), (5, 37)), ((1, 2), (6, 75)), ((2, 1), (9, 20))])
def test_shared_front_runs(rng, monkeypatch, dtype, stride, shape, fused):
    """The shared front end's horizontal pass stores its rows in runs of 32 (float32) or 16 (float64) values: rows
    of 71, 33 and 36 outputs (several runs, the last partial) and of 16 (runs across rows, the last through the scratch
    run); in the fused layer and in the unfused front end."""
    monkeypatch.setattr(FB, "USE_SHARED_FUSED", fused)
    f = _shared_factors(rng, 6, 8, 3, 5, (2, 1, 3), (3, 5), 4, 3, dtype)
    x = rng.standard_normal((2, 6) + shape).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    y = shared_separable_conv2d(x, *f, b, stride=stride, padding=(1, 0, 0, 0))
    ref = conv2d_einsum(x, _dense_kernel("shared", f), b, stride, (1, 0, 0, 0))
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("X,Y,K", [(1, 7, 4), (7, 2, 5), (4, 6, 2)])
def test_cp_reduce_first_tap_counts_and_quads(rng, monkeypatch, dtype, X, Y, K):
    """The reduce-first front end (forced) on the tap counts and component quads of the folded one's test, with
    groups of 1 to 5 channels (the reduction's sweeps of 5, 3 and 1 channels)."""
    from npconv.kernels.cpu import bicluster as KB
    monkeypatch.setattr(KB, "cp_reduce_first", lambda *a: True)
    f = _cp_factors(rng, 12, 8, X, Y, (1, 2, 4, 5), (3, 5), K, dtype)
    x = rng.standard_normal((2, 12, 13, 17)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    for stride, pad in (((1, 1), (0, 0, 0, 0)), ((2, 3), (1, 0, 0, 2))):
        y = bicluster_cp_conv2d(x, *f, b, stride=stride, padding=pad)
        np.testing.assert_allclose(y, conv2d_naive(x, _dense_kernel("cp", f), b, stride, pad), *tolerance(dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_uneven_groups_and_no_bias(rng, kind):
    f = _make(kind, rng, np.float64, C=7, F=9, in_sizes=(1, 4, 2), out_sizes=(2, 3, 4))
    x = rng.standard_normal((3, 7, 8, 8))
    y = _run(kind, x, f, None, (2, 1), (1, 1, 0, 2))
    np.testing.assert_allclose(y, conv2d_einsum(x, _dense_kernel(kind, f), None, (2, 1), (1, 1, 0, 2)),
                               *tolerance(np.float64))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(rng, kind, dtype):
    f = _make(kind, rng, dtype)
    big = rng.standard_normal((3, 12, 10, 9)).astype(dtype)
    x = big[::2, ::2].transpose(0, 1, 3, 2)                     # (2, 6, 9, 10), strided and transposed
    assert not x.flags.c_contiguous
    fnc = tuple(np.asfortranarray(a) if a.ndim > 1 and a.dtype.kind == "f" else a for a in f)
    b = rng.standard_normal(16).astype(dtype)[::2]
    y = _run(kind, x, fnc, b, (2, 2), (1, 0, 1, 0))
    np.testing.assert_allclose(y, conv2d_einsum(x, _dense_kernel(kind, f), b, (2, 2), (1, 0, 1, 0)),
                               *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("taps", ["fused", "implicit-gemm", "patches"])
@pytest.mark.parametrize("K1,K2", [(5, 13), (7, 20), (4, 25)])
def test_svd_block_convs_both_ways(rng, monkeypatch, dtype, taps, K1, K2):
    """The SVD form's block convolutions as an implicit GEMM over the reduced planes (USE_TAPS), fused with the
    reduction and the expansion per image and band (``kernels/cpu/svd_fused.py``) or not, and as
    patch matrices + GEMM: K2 past one row block (partial last blocks of 1, 8 and 1 rows), an odd-sized map with
    stride 2 and padding, and chunks of 2 images (the planes' channel stride changes with the chunk)."""
    monkeypatch.setattr(FB, "USE_TAPS", taps != "patches")
    monkeypatch.setattr(FB, "USE_SVD_FUSED", taps == "fused")
    f = _svd_factors(rng, 9, 14, 5, 5, (4, 5), (6, 8), K1, K2, dtype)
    x = rng.standard_normal((5, 9, 23, 20)).astype(dtype)
    b = rng.standard_normal(14).astype(dtype)
    ref = conv2d_einsum(x, _dense_kernel("svd", f), b, (2, 2), (2, 1, 0, 2))
    for cols in (None, 2 * 11 * 9):          # the output is 11 x 9
        if cols is not None:
            monkeypatch.setattr(FB, "_TARGET_COLUMNS", cols)     # chunks of 2 images: 2 + 2 + 1
        y = bicluster_svd_conv2d(x, *f, b, stride=2, padding=(2, 1, 0, 2))
        np.testing.assert_allclose(y, ref, *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bands", ["one", "two", "rows1", "uneven"])
@pytest.mark.parametrize("stride,padding", GEOMS + [((1, 2), (3, 0, 0, 4))])
def test_svd_fused_geometries(rng, monkeypatch, dtype, bands, stride, padding):
    """The fused SVD layer (per image and band of output rows; where the CPU has the micro-kernel's 12-row tile, else
    the unfused path) on strides 1 to 3 and uneven padding, in one band an image, two, bands of one row and a last
    band shorter than the others (each band's reduction reads its own input rows, its planes' borders zeroed for
    it: padding at the top and bottom bands only), with a partial reduction row block (H*K1 = 2*5), uneven input and
    output groups (3 + 4 channels, 5 + 9 filters: the expansion's 8-row and 12 + 4-row tiles), with the bias and
    without it into a given ``out``; against the rebuilt kernel's conv."""
    f = _svd_factors(rng, 7, 14, 3, 4, (3, 4), (5, 9), 5, 7, dtype)
    x = rng.standard_normal((3, 7, 12, 13)).astype(dtype)
    b = rng.standard_normal(14).astype(dtype)
    OH = (12 + padding[0] + padding[1] - 3) // stride[0] + 1
    monkeypatch.setattr(FB, "_fused_band_rows", lambda *a: _band_rows(OH, bands))
    ref = conv2d_einsum(x, _dense_kernel("svd", f), b, stride, padding)
    np.testing.assert_allclose(bicluster_svd_conv2d(x, *f, b, stride=stride, padding=padding), ref, *tolerance(dtype))
    out = np.full(ref.shape, np.nan, dtype)
    bicluster_svd_conv2d(x, *f, None, stride=stride, padding=padding, out=out)
    np.testing.assert_allclose(out, conv2d_einsum(x, _dense_kernel("svd", f), None, stride, padding),
                               *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bands", ["one", "two", "rows1", "uneven"])
@pytest.mark.parametrize("stride,padding", GEOMS + [((1, 2), (3, 0, 0, 4))])
def test_shared_fused_geometries(rng, monkeypatch, dtype, stride, padding, bands):
    """The fused shared-separable layer (per image and band of output rows; where the CPU has the micro-kernel's
    12-row tile, else the unfused path) on strides 1 to 3 and uneven padding, in one band an image, two, bands of one
    row and a last band shorter than the others; uneven input and output groups (1 + 3 + 2 channels, 5 + 15 filters:
    the expansion's 8-row and 12 + 4-row tiles), rows of 37 outputs at stride 1 (a panel and a one-vector last
    panel), with the bias and without it into a given ``out``; against the rebuilt kernel's conv."""
    f = _shared_factors(rng, 6, 20, 3, 4, (1, 3, 2), (5, 15), 3, 4, dtype)
    x = rng.standard_normal((3, 6, 9, 40)).astype(dtype)
    b = rng.standard_normal(20).astype(dtype)
    OH = (9 + padding[0] + padding[1] - 3) // stride[0] + 1
    monkeypatch.setattr(FB, "_fused_band_rows", lambda *a: _band_rows(OH, bands))
    ref = conv2d_einsum(x, _dense_kernel("shared", f), b, stride, padding)
    np.testing.assert_allclose(shared_separable_conv2d(x, *f, b, stride=stride, padding=padding), ref,
                               *tolerance(dtype))
    out = np.full(ref.shape, np.nan, dtype)
    shared_separable_conv2d(x, *f, None, stride=stride, padding=padding, out=out)
    np.testing.assert_allclose(out, conv2d_einsum(x, _dense_kernel("shared", f), None, stride, padding),
                               *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_fused_groups_of_many_filters(rng, dtype):
    """The fused shared-separable layer (``kernels/cpu/shared_gemm.py``) where a group uses more shared filters than
    the micro-kernel's tile has rows (up to 20 of 24: row blocks of 12 and of 8 or 4 a channel) and has up to 3
    channels; against the rebuilt kernel's conv, one image in two bands and three images."""
    from npconv.functional.bicluster import shared_plan
    f = _shared_factors(rng, 6, 9, 3, 5, (3, 1, 2), (4, 5), 12, 24, dtype)
    used_ptr = shared_plan(f[3], 24)[0]
    assert np.diff(used_ptr).max() > 12          # some group runs a second row block
    b = rng.standard_normal(9).astype(dtype)
    for N in (1, 3):
        x = rng.standard_normal((N, 6, 11, 13)).astype(dtype)
        y = shared_separable_conv2d(x, *f, b, stride=(1, 2), padding=(1, 1, 2, 0))
        np.testing.assert_allclose(y, conv2d_einsum(x, _dense_kernel("shared", f), b, (1, 2), (1, 1, 2, 0)),
                                   *tolerance(dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("microkernel", [True, False], ids=["microkernel", "blas"])
def test_batch_chunking(rng, kind, monkeypatch, microkernel):
    """A tiny workspace bound forces one image per chunk (and a partial last chunk of the default run), in the unfused
    paths (the fused ones take a batch in one pass)."""
    for flag in ("USE_CP_FUSED", "USE_SVD_FUSED", "USE_SHARED_FUSED"):
        monkeypatch.setattr(FB, flag, False)
    monkeypatch.setattr(FB, "USE_MICROKERNEL", microkernel)
    f = _make(kind, rng, np.float32)
    x = rng.standard_normal((5, 6, 9, 9)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    ref = conv2d_einsum(x, _dense_kernel(kind, f), b, (2, 2), (1, 1, 1, 1))
    monkeypatch.setattr(FB, "_WORKSPACE_BYTES", 1)
    y1 = _run(kind, x, f, b, 2, 1)
    monkeypatch.setattr(FB, "_WORKSPACE_BYTES", 32 * 2**20)
    monkeypatch.setattr(FB, "_TARGET_COLUMNS", 2 * 25)   # chunks of 2 images: 2 + 2 + 1
    y2 = _run(kind, x, f, b, 2, 1)
    np.testing.assert_allclose(y1, ref, *tolerance(np.float32))
    np.testing.assert_allclose(y2, ref, *tolerance(np.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_composed_path_used_on_gpu(rng, kind, dtype):
    """The CuPy path composes conv2d calls; it runs on NumPy arrays too, so its logic is checked here."""
    for in_sizes, out_sizes in (((2, 2, 2), (4, 4)), ((1, 3, 2), (3, 5))):
        f = _make(kind, rng, dtype, in_sizes=in_sizes, out_sizes=out_sizes)
        x = rng.standard_normal((2, 6, 9, 8)).astype(dtype)
        b = rng.standard_normal(8).astype(dtype)
        stride, pad = (2, 1), (1, 0, 2, 1)
        if kind == "cp":
            y = FB._cp_composed(x, *f[:7], f[7], b, stride, pad)
        elif kind == "svd":
            y = FB._svd_composed(x, *f[:6], f[6], b, stride, pad)
        else:
            y = FB._shared_composed(x, *f[:8], f[8], b, stride, pad)
        ref = conv2d_einsum(x, _dense_kernel(kind, f), b, stride, pad)
        assert y.dtype == dtype
        np.testing.assert_allclose(y, ref, *tolerance(dtype))


def test_bicluster_conv2d_dispatches_on_factor_count(rng):
    x = rng.standard_normal((1, 6, 7, 7))
    for kind in ("cp", "svd"):
        f = _make(kind, rng, np.float64)
        np.testing.assert_allclose(bicluster_conv2d(x, *f, stride=2, padding=1),
                                   conv2d_einsum(x, _dense_kernel(kind, f), None, (2, 2), (1, 1, 1, 1)),
                                   *tolerance(np.float64))
    with pytest.raises(ValueError, match="8 arrays"):
        bicluster_conv2d(x, *f[:5])


def test_validation(rng):
    f = list(_make("cp", rng, np.float32))
    x = rng.standard_normal((1, 6, 7, 7)).astype(np.float32)
    with pytest.raises(TypeError, match="reduce must have the dtype of x"):
        bicluster_cp_conv2d(x, *f[:2], f[2].astype(np.float64), *f[3:])
    with pytest.raises(TypeError, match="x must have dtype"):
        bicluster_cp_conv2d(x.astype(np.int32), *f)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        bicluster_cp_conv2d(x[0], *f)
    with pytest.raises(ValueError, match="6 input channels, but x has 5"):
        bicluster_cp_conv2d(x[:, :5], *f)
    with pytest.raises(ValueError, match="in_perm must be a permutation"):
        bicluster_cp_conv2d(x, np.array([0, 1, 2, 3, 4, 6]), *f[1:])
    with pytest.raises(ValueError, match="in_perm must be a permutation"):
        bicluster_cp_conv2d(x, np.array([0, 1, 2, 3, 4, 4]), *f[1:])
    with pytest.raises(ValueError, match="in_offsets must rise strictly"):
        bicluster_cp_conv2d(x, f[0], np.array([0, 3, 3, 6]), *f[2:])
    with pytest.raises(TypeError, match="out_perm must be an integer array"):
        bicluster_cp_conv2d(x, *f[:6], f[6].astype(np.float32), f[7])
    with pytest.raises(ValueError, match="vertical must have shape"):
        bicluster_cp_conv2d(x, *f[:3], f[3][:, :1], *f[4:])
    with pytest.raises(ValueError, match="expand must have shape"):
        bicluster_cp_conv2d(x, *f[:5], f[5][:, :2], *f[6:])
    with pytest.raises(ValueError, match="bias must have shape"):
        bicluster_cp_conv2d(x, *f, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        bicluster_cp_conv2d(x, *f, stride=0)
    with pytest.raises(ValueError, match="output height"):
        bicluster_cp_conv2d(x[:, :, :2], *f)
    s = list(_make("shared", rng, np.float32))
    with pytest.raises(ValueError, match="assign must index"):
        shared_separable_conv2d(x, *s[:3], s[3] + 7, *s[4:])
    with pytest.raises(TypeError, match="assign must be an integer array"):
        shared_separable_conv2d(x, *s[:3], s[3].astype(np.float32), *s[4:])
    v = list(_make("svd", rng, np.float32))
    with pytest.raises(ValueError, match="spatial must have shape"):
        bicluster_svd_conv2d(x, *v[:3], v[3][:, :, :, :1], *v[4:])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_matches_cpu(rng, kind):
    import cupy as cp
    f = _make(kind, rng, np.float32)
    x = rng.standard_normal((2, 6, 9, 9)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    y_cpu = _run(kind, x, f, b, 2, 1)
    y_gpu = _run(kind, cp.asarray(x), tuple(cp.asarray(a) for a in f), cp.asarray(b), 2, 1)
    np.testing.assert_allclose(cp.asnumpy(y_gpu), y_cpu, *tolerance(np.float32))


def test_chunk_rule():
    """Images per chunk: at most N, enough for the target GEMM columns, the intermediates within the cache bound
    given (the CP and shared forms' smaller one) and within the workspace; one image when a single one exceeds them."""
    from npconv.functional import bicluster as FB
    per_img = 5 * 2**20 // 4                                  # 5 MiB of float32 intermediates an image
    assert FB._chunk(128, 676, per_img, 4) == 3               # 16 MiB bound: 3 images (target columns: 4)
    assert FB._chunk(128, 676, per_img, 4, FB._CP_CACHE_BYTES) == 2
    assert FB._chunk(2, 676, per_img, 4) == 2                 # never more than the batch
    assert FB._chunk(1000, 10, 16, 4) == -(-FB._TARGET_COLUMNS // 10)   # small images: the target columns
    assert FB._chunk(128, 676, 64 * 2**20, 4) == 1            # one image alone exceeds every bound
