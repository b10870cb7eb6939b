"""npconv's GEMM micro-kernel (npconv/kernels/cpu/gemm.py) against float64 NumPy products.

The shapes straddle every edge of the tiling: rows around multiples of MR (the last row block through the scratch
tile), columns around multiples of the panel width NR (the last panel reads past the image), K around the K block
(the accumulate mode), several images and row-block groups per job. The AVX2 tile is compiled in a subprocess for
a Haswell target where the host can run it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from npconv.kernels.cpu import gemm as G

DTYPES = [np.float32, np.float64]
pytestmark = pytest.mark.skipif(G.tile_shape(np.float32) is None, reason="this CPU has neither AVX2 nor AVX-512")


def _run(A, Bm, P, nimg, bias, mgroups, KC, dtype, rowmap=None, pfb=0):
    """gemm_images on (M, K) A and (K, nimg*P) B; returns (nimg, M, P) (rows permuted by ``rowmap``); ``pfb``: the
    B panel prefetch distance (0: none)."""
    VW, MR, NV = G.tile_shape(dtype)
    NR = VW * NV
    M, K = A.shape
    ld = Bm.shape[1]
    # the NR values past the last column are readable but must never reach the output: NaN shows if they do
    bflat = np.concatenate([Bm.ravel(), np.full(NR, np.nan, dtype)])
    c = np.full(nimg * M * P + 5, np.nan, dtype)
    has_b = bias is not None
    G.gemm_images(G.pack_a(A, MR), M, K, MR, NR, KC, bflat, ld, P, nimg, c, M * P,
                  bias if has_b else np.zeros(1, dtype), has_b, mgroups,
                  np.zeros(1, np.int64) if rowmap is None else rowmap, rowmap is not None, pfb,
                  1, 0, 0, 0, False)   # every argument, as matmul passes them: omitted ones would compile it again
    assert np.isnan(c[nimg * M * P:]).all(), "wrote past the last output"
    return c[:nimg * M * P].reshape(nimg, M, P)


def _reference(A, Bm, P, nimg, bias):
    A64 = A.astype(np.float64)
    out = np.stack([A64 @ Bm[:, i * P:(i + 1) * P].astype(np.float64) for i in range(nimg)])
    return out if bias is None else out + bias.astype(np.float64)[None, :, None]


def _tol(dtype, K):
    return (2e-6 if dtype == np.float32 else 1e-14) * max(1.0, np.sqrt(K))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dm", [-1, 0, 1, 4, 5, 8])     # a last row block of 1-4 rows: the 4-row tile; 5-8: 8 rows
@pytest.mark.parametrize("dp", [-1, 0, 1, 7])
def test_gemm_images_edges(rng, dtype, dm, dp):
    VW, MR, NV = G.tile_shape(dtype)
    NR = VW * NV
    M = max(1, 2 * MR + dm)
    P = max(1, 2 * NR + dp)
    K, nimg, KC = 37, 2, 16                        # three K blocks, the last one short
    A = rng.standard_normal((M, K)).astype(dtype)
    Bm = rng.standard_normal((K, nimg * P)).astype(dtype)
    bias = rng.standard_normal(M).astype(dtype)
    for mgroups, pfb in ((1, 0), (2, 0), (5, 0), (1, 2), (2, 1), (5, 3)):
        got = _run(A, Bm, P, nimg, bias, mgroups, KC, dtype, pfb=pfb)
        ref = _reference(A, Bm, P, nimg, bias)
        np.testing.assert_allclose(got, ref, rtol=_tol(dtype, K), atol=_tol(dtype, K) * np.abs(ref).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", ["1", "VW-1", "VW", "VW+1"])
@pytest.mark.parametrize("dm", [0, -5])          # whole row blocks, and a partial last one
def test_gemm_images_last_panel_widths(rng, dtype, extra, dm):
    """A last panel of 1, VW - 1, VW and VW + 1 columns (through the scratch tile), over whole row blocks and a
    partial last one; 3 K blocks, so the scratch tile also accumulates."""
    VW, MR, NV = G.tile_shape(dtype)
    NR = VW * NV
    P = 2 * NR + {"1": 1, "VW-1": VW - 1, "VW": VW, "VW+1": VW + 1}[extra]
    M, K = 3 * MR + dm, 37
    A = rng.standard_normal((M, K)).astype(dtype)
    Bm = rng.standard_normal((K, P)).astype(dtype)
    bias = rng.standard_normal(M).astype(dtype)
    for mgroups in (1, 3):
        got = _run(A, Bm, P, 1, bias, mgroups, 16, dtype)
        ref = _reference(A, Bm, P, 1, bias)
        np.testing.assert_allclose(got, ref, rtol=_tol(dtype, K), atol=_tol(dtype, K) * np.abs(ref).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,P,nimg,KC", [
    (1, 1, 1, 1, 64),          # one value
    (3, 5, 2, 4, 64),          # every tile an edge tile
    (30, 300, 40, 3, 64),      # K blocks of 64
    (64, 200, 256, 1, 512),    # one K block, whole panels and row blocks only
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_images_shapes(rng, dtype, M, K, P, nimg, KC, with_bias):
    A = rng.standard_normal((M, K)).astype(dtype)
    # a chunk buffer wider than the images it holds (ld > nimg * P), as the conv's last chunk has
    Bm = rng.standard_normal((K, nimg * P + 3)).astype(dtype)
    bias = rng.standard_normal(M).astype(dtype) if with_bias else None
    ref = _reference(A, Bm, P, nimg, bias)
    for pfb in (0, G.PREFETCH_PANELS):
        got = _run(A, Bm, P, nimg, bias, 2, KC, dtype, pfb=pfb)
        np.testing.assert_allclose(got, ref, rtol=_tol(dtype, K), atol=_tol(dtype, K) * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_images_row_map(rng, dtype):
    """Output rows permuted by a row map (the biclustered layers' output groups), every tile through scratch."""
    VW, MR, NV = G.tile_shape(dtype)
    M, K, P, nimg = MR + 3, 40, 2 * VW * NV + 3, 2
    A = rng.standard_normal((M, K)).astype(dtype)
    Bm = rng.standard_normal((K, nimg * P)).astype(dtype)
    bias = rng.standard_normal(M).astype(dtype)
    perm = rng.permutation(M).astype(np.int64)
    got = _run(A, Bm, P, nimg, bias, 2, 16, dtype, rowmap=perm)
    ref = np.empty_like(got, dtype=np.float64)
    ref[:, perm] = _reference(A, Bm, P, nimg, bias)
    np.testing.assert_allclose(got, ref, rtol=_tol(dtype, K), atol=_tol(dtype, K) * np.abs(ref).max())
    # the wrapper: same product through matmul()
    c = np.full(nimg * M * P, np.nan, dtype)
    b = np.concatenate([Bm.ravel(), np.zeros(VW * NV, dtype)])
    G.matmul(G.pack_a(A, MR), M, K, G.tile_shape(dtype), b, nimg * P, P, c, nimg=nimg, cimg=M * P, bias=bias,
             rowmap=perm)
    tol = _tol(dtype, K)
    np.testing.assert_allclose(c.reshape(nimg, M, P), ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,P,nimg,with_bias", [(13, 37, 45, 1, False), (29, 300, 70, 2, True), (4, 5, 3, 3, True)])
def test_matmul_batch_of_products(rng, dtype, M, K, P, nimg, with_bias):
    """Several products in one call (Winograd's 16), each with its own A, B and C at strides apart; gaps between
    the products' outputs stay untouched (NaN), and so does everything past the last."""
    VW, MR, NV = G.tile_shape(dtype)
    NR = VW * NV
    nb = 5
    As = [rng.standard_normal((M, K)).astype(dtype) for _ in range(nb)]
    Bs = [rng.standard_normal((K, nimg * P)).astype(dtype) for _ in range(nb)]
    bias = rng.standard_normal(M).astype(dtype) if with_bias else None
    packs = [G.pack_a(a, MR) for a in As]
    bstride = K * nimg * P + 3                    # products apart by more than their size
    cstride = nimg * M * P + 7
    b = np.full(nb * bstride + NR, np.nan, dtype)
    for x, Bm in enumerate(Bs):               # NaN between them: the last panels' loads must not reach C
        b[x * bstride:x * bstride + Bm.size] = Bm.ravel()
    c = np.full(nb * cstride + 5, np.nan, dtype)
    G.matmul(np.concatenate(packs), M, K, G.tile_shape(dtype), b, nimg * P, P, c, nimg=nimg, cimg=M * P, bias=bias,
             batch=(nb, packs[0].shape[0], bstride, cstride))
    tol = _tol(dtype, K)
    for x in range(nb):
        ref = _reference(As[x], Bs[x], P, nimg, bias)
        got = c[x * cstride:x * cstride + nimg * M * P].reshape(nimg, M, P)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))
        assert np.isnan(c[x * cstride + nimg * M * P:(x + 1) * cstride]).all(), "wrote between products"
    assert np.isnan(c[nb * cstride:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_images_empty_sum_is_the_bias(dtype):
    bias = np.arange(1, 4, dtype=dtype)
    got = _run(np.zeros((3, 0), dtype), np.zeros((0, 10), dtype), 5, 2, bias, 1, 64, dtype)
    np.testing.assert_array_equal(got, np.broadcast_to(bias[None, :, None], (2, 3, 5)))


@pytest.mark.parametrize("dtype", DTYPES + [np.int64])
@pytest.mark.parametrize("kind", ["write", "read"])
def test_prefetches_change_nothing_and_are_emitted(dtype, kind):
    import numba
    pf = G.prefetch_write if kind == "write" else G.prefetch_read

    @numba.njit
    def touch(a, step):
        for i in range(0, a.shape[0], step):
            pf(a, i)
        pf(a, np.int32(a.shape[0] - 1))     # a 32-bit index is widened
        return a.sum()

    a = np.arange(1000).astype(dtype)
    before = a.copy()
    assert touch(a, 7) == before.sum()
    np.testing.assert_array_equal(a, before)
    asm = "\n".join(touch.inspect_asm().values())
    if kind == "write" and "prfchw" in G._target_features():
        # x86 with PREFETCHW: a write prefetch, not a read one, and not dropped
        assert "prefetchw" in asm
    elif kind == "read" and "sse" in G._target_features():
        # locality 2: prefetcht1, not dropped and not a write prefetch
        assert "prefetcht1" in asm and "prefetchw" not in asm


def test_pack_a_layout(rng):
    a = rng.standard_normal((7, 5)).astype(np.float32)
    ap = G.pack_a(a, 4).reshape(2, 5, 4)
    # block b, step k, row r holds a[4b + r, k]; rows past the matrix are zero
    for blk in range(2):
        for k in range(5):
            for r in range(4):
                assert ap[blk, k, r] == (a[4 * blk + r, k] if 4 * blk + r < 7 else 0)


def test_tile_shape_follows_the_features():
    assert G.tile_shape(np.float32, {"avx512f", "avx2", "fma"}) == (16, 12, 2)
    assert G.tile_shape(np.float64, {"avx512f"}) == (8, 12, 2)
    assert G.tile_shape(np.float32, {"avx2", "fma"}) == (8, 6, 2)
    assert G.tile_shape(np.float64, {"avx2", "fma"}) == (4, 6, 2)
    assert G.tile_shape(np.float32, {"avx2"}) is None
    assert G.tile_shape(np.float32, {"sse4.2"}) is None


_AVX2_SCRIPT = textwrap.dedent("""
    import numpy as np
    from npconv.kernels.cpu import gemm as G
    rng = np.random.default_rng(5)
    for dt in (np.float32, np.float64):
        VW, MR, NV = G.tile_shape(dt)
        assert (VW, MR, NV) == (32 // np.dtype(dt).itemsize, 6, 2), (VW, MR, NV)
        NR = VW * NV
        M, K, P, nimg = 2 * MR + 1, 70, 3 * NR + 5, 2
        A = rng.standard_normal((M, K)).astype(dt)
        Bm = rng.standard_normal((K, nimg * P)).astype(dt)
        bias = rng.standard_normal(M).astype(dt)
        b = np.concatenate([Bm.ravel(), np.zeros(NR, dt)])
        c = np.empty(nimg * M * P, dt)
        G.gemm_images(G.pack_a(A, MR), M, K, MR, NR, 32, b, nimg * P, P, nimg, c, M * P, bias, True, 2,
                      np.zeros(1, np.int64), False)
        ref = np.stack([A.astype(float) @ Bm[:, i * P:(i + 1) * P] + bias[:, None] for i in range(nimg)])
        err = np.abs(c.reshape(nimg, M, P) - ref).max() / np.abs(ref).max()
        assert err < (1e-5 if dt == np.float32 else 1e-13), err
    print("ok")
""")


def test_avx2_tile_in_a_haswell_build(tmp_path):
    """The 6 x 2 tile LLVM compiles for an AVX2 target (16 vector registers) gives the same products."""
    feats = G._target_features()
    if not {"avx2", "fma"} <= feats:
        pytest.skip("the host cannot run AVX2 code")
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+sse,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+f16c,+bmi,"
                                  "+bmi2,+lzcnt,+movbe,+cx16")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


_STREAM_OK = G.tile_shape(np.float32) is not None and G.tile_shape(np.float32)[1] % 4 == 0


@pytest.mark.skipif(not _STREAM_OK, reason="matmul_stream needs the AVX-512 tile (row blocks of 12)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,P,nimg", [
    (96, 8, 300, 2),       # whole 4-row groups, a partial last panel
    (13, 5, 64, 3),        # a last group of 1 row (scratch), whole panels only
    (6, 1, 7, 1),          # fewer columns than one panel: all columns past the panels
    (30, 16, 129, 2),      # a last group of 2 rows and one column past the panels
    (4, 0, 40, 2),         # an empty sum: the bias
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_stream(rng, dtype, M, K, P, nimg, with_bias):
    tile = G.tile_shape(dtype)
    A = rng.standard_normal((M, K)).astype(dtype)
    # each image's K x P block, then a gap (bimg > K*P): nothing outside the blocks may be read into the result
    bimg = K * P + 3
    b = np.full(nimg * bimg, np.nan, dtype)
    blocks = rng.standard_normal((nimg, K, P)).astype(dtype)
    for i in range(nimg):
        b[i * bimg:i * bimg + K * P] = blocks[i].ravel()
    bias = rng.standard_normal(M).astype(dtype) if with_bias else None
    cimg = M * P + 2
    c = np.full(nimg * cimg + 1, np.nan, dtype)
    G.matmul_stream(G.pack_a(A, tile[1]), M, K, tile, b, bimg, P, c, nimg=nimg, cimg=cimg, bias=bias)
    ref = np.einsum("fk,ikp->ifp", A.astype(np.float64), blocks.astype(np.float64))
    if with_bias:
        ref += bias.astype(np.float64)[None, :, None]
    got = np.stack([c[i * cimg:i * cimg + M * P].reshape(M, P) for i in range(nimg)])
    tol = _tol(dtype, max(K, 1))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))
    # the gaps between the images' outputs are untouched
    gaps = np.concatenate([c[i * cimg + M * P:(i + 1) * cimg] for i in range(nimg)] + [c[nimg * cimg:]])
    assert np.isnan(gaps).all()


def test_matmul_stream_rejects_the_avx2_tile():
    with pytest.raises(ValueError, match="multiple of 4"):
        G.matmul_stream(np.zeros(12, np.float32), 2, 1, (8, 6, 2), np.zeros(4, np.float32), 2, 2,
                        np.zeros(4, np.float32))


@pytest.mark.skipif(not _STREAM_OK, reason="gemm_stream needs the AVX-512 tile (row blocks of 12)")
@pytest.mark.parametrize("nsplit", [1, 2, 3, 9])
def test_gemm_stream_column_splits(rng, nsplit):
    """Each 4-row group's columns cut in nsplit ranges (more ranges than panels included): same result."""
    dtype = np.float32
    VW, MR, NV = G.tile_shape(dtype)
    NR = VW * NV
    M, K, P, nimg = 10, 6, 5 * NR + 3, 2
    A = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal(nimg * K * P).astype(dtype)
    bias = np.zeros(12, dtype)
    bias[:M] = rng.standard_normal(M)
    c = np.full(nimg * M * P, np.nan, dtype)
    G.gemm_stream(G.pack_a(A, MR), M, K, MR, NR, b, K * P, P, nimg, c, M * P, bias, nsplit)
    ref = np.einsum("fk,ikp->ifp", A.astype(np.float64), b.reshape(nimg, K, P)) + bias[:M, None]
    np.testing.assert_allclose(c.reshape(nimg, M, P), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
