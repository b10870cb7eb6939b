"""The implicit GEMM of npconv/kernels/cpu/gemm_taps.py against plain loops in float64.

The filters' rows straddle the row-block edges (the 4- and 8-row tiles of a partial last block), the padded
positions of an image end mid-panel and mid-row, strides 1 and 2 (phase-split planes) and several images and
row-block groups per call. The output and the input slack are NaN-filled: a value written where it must not be, or
a dropped column read into the result, shows.
"""
from __future__ import annotations

import numpy as np
import pytest

from npconv.kernels.cpu import gemm as G
from npconv.kernels.cpu import gemm_taps as GT

DTYPES = [np.float32, np.float64]
pytestmark = pytest.mark.skipif(G.tile_shape(np.float32) is None or G.tile_shape(np.float32)[1] != 12,
                                reason="the implicit GEMM runs the AVX-512 12-row tile")


def _phase_planes(x, X, Y, sh, sw, OH, OW):
    """x (n, C, H, W) split into (n, C, sh, sw, R, Mq) planes, zero beyond the image, and the tap offsets of
    (c, dx, dy) in one image's block of planes."""
    n, C, H, W = x.shape
    R = -(-((OH - 1) * sh + X) // sh)
    Mq = -(-((OW - 1) * sw + Y) // sw)
    planes = np.zeros((n, C, sh, sw, R, Mq), x.dtype)
    for ph in range(sh):
        for pw in range(sw):
            sub = x[:, :, ph::sh, pw::sw][:, :, :R, :Mq]
            planes[:, :, ph, pw, :sub.shape[2], :sub.shape[3]] = sub
    c, dx, dy = np.meshgrid(np.arange(C), np.arange(X), np.arange(Y), indexing="ij")
    koff = (((c * sh + dx % sh) * sw + dy % sw) * R + dx // sh) * Mq + dy // sw
    koff = np.ascontiguousarray(koff.ravel().astype(np.int64))
    koff.flags.writeable = False     # read-only as the SVD layer's cached offsets: a writable array compiles again
    return planes, koff, R, Mq


def _naive(w, x, sh, sw, OH, OW):
    """The strided correlation of x (n, C, H, W) with w (M, C, X, Y), float64 loops over the taps."""
    n = x.shape[0]
    M, C, X, Y = w.shape
    out = np.zeros((n, M, OH, OW))
    x64 = x.astype(np.float64)
    for c in range(C):
        for dx in range(X):
            for dy in range(Y):
                patch = x64[:, c, dx:dx + (OH - 1) * sh + 1:sh, dy:dy + (OW - 1) * sw + 1:sw]
                out += w[:, c, dx, dy].astype(np.float64)[None, :, None, None] * patch[:, None]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 9, 12, 13, 20, 24, 51])
@pytest.mark.parametrize("geom", [
    # (C, H, W, X, Y, sh, sw): ZF conv2's block shape scaled down, unstrided, mixed strides
    (3, 19, 21, 5, 5, 2, 2),
    (2, 9, 40, 3, 3, 1, 1),
    (4, 11, 13, 2, 3, 1, 2),
])
def test_matches_loops(rng, dtype, M, geom):
    C, H, W, X, Y, sh, sw = geom
    VW, MR, NV = G.tile_shape(dtype)
    NR = VW * NV
    OH = (H - X) // sh + 1
    OW = (W - Y) // sw + 1
    n = 3
    x = rng.standard_normal((n, C, H, W)).astype(dtype)
    w = rng.standard_normal((M, C, X, Y)).astype(dtype)
    planes, koff, R, Mq = _phase_planes(x, X, Y, sh, sw, OH, OW)
    bimg = C * sh * sw * R * Mq
    # the last panel and the taps read past the last image's planes: NaN there must stay in dropped columns
    b = np.concatenate([planes.ravel(), np.full(NR + Y, np.nan, dtype)])
    ref = _naive(w, x, sh, sw, OH, OW)
    P = OH * OW
    ap = G.pack_a(w.reshape(M, -1), MR)
    for mgroups in (1, 2, 3):
        ldc = n * P + 5
        c = np.full(M * ldc, np.nan, dtype)
        GT.gemm_taps_images(ap, M, C * X * Y, MR, NR, b, bimg, koff, Mq, OH, OW, n, c, ldc, P, mgroups)
        got = c.reshape(M, ldc)
        assert np.isnan(got[:, n * P:]).all(), "wrote past an output row's images"
        got = got[:, :n * P].reshape(M, n, OH, OW).transpose(1, 0, 2, 3)
        tol = (3e-6 if dtype == np.float32 else 1e-14) * np.sqrt(C * X * Y)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


def _phase_split_ref(y, sh, sw, pt, pl, R, Mz):
    """y (n, M, H, W) padded by (pt, pl) at the top/left, zero elsewhere, split into (M, n, sh, sw, R, Mz) planes."""
    n, M, H, W = y.shape
    pad = np.zeros((n, M, max(R * sh, pt + H), max(Mz * sw, pl + W)))
    pad[:, :, pt:pt + H, pl:pl + W] = y
    pad = pad[:, :, :R * sh, :Mz * sw]
    out = np.empty((M, n, sh, sw, R, Mz))
    for ph in range(sh):
        for pw in range(sw):
            out[:, :, ph, pw] = pad[:, :, ph::sh, pw::sw].transpose(1, 0, 2, 3)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 12, 13, 38])
@pytest.mark.parametrize("geom", [
    # (C, H, W, sh, sw, pt, pl, extra rows, extra columns): the SVD form's reduction before a 5 x 5 / 2 conv,
    # padding, an unstrided plane, more plane than image
    (7, 13, 11, 2, 2, 0, 0, 0, 0),
    (5, 9, 40, 2, 2, 2, 1, 1, 2),
    (4, 6, 5, 1, 1, 1, 1, 0, 0),
    (3, 8, 9, 1, 2, 0, 3, 2, 0),
    (4, 12, 15, 2, 2, 1, 0, -1, -2),              # planes smaller than the image: the last rows and columns dropped
])
def test_phase_split_product_matches_numpy(rng, dtype, M, geom):
    C, H, W, sh, sw, pt, pl, er, ec = geom
    VW, MR, NV = G.tile_shape(dtype)
    NR = VW * NV
    n = 3
    R = -(-(H + pt) // sh) + er
    Mz = -(-(W + pl) // sw) + ec
    x = rng.standard_normal((n, C + 2, H, W)).astype(dtype)
    chans = rng.permutation(C + 2)[:C]            # a group's channels, in place in a wider input
    a = rng.standard_normal((M, C)).astype(dtype)
    koff = np.ascontiguousarray(chans * H * W, dtype=np.int64)
    ref = _phase_split_ref(np.einsum("mc,nchw->nmhw", a.astype(np.float64), x[:, chans].astype(np.float64)),
                           sh, sw, pt, pl, R, Mz)
    plane = sh * sw * R * Mz
    for mgroups, pfb in ((1, 0), (2, 2), (3, 1)):
        z = np.full(M * n * plane + 7, np.nan, dtype)
        GT.zero_phase_borders(z, M * n, sh, sw, R, Mz, H, W, pt, pl)
        GT.gemm_taps_phase(G.pack_a(a, MR), M, C, MR, NR, x.reshape(-1), (C + 2) * H * W, koff, H, W, n, z,
                           n * plane, plane, sh, sw, R, Mz, pt, pl, mgroups, pfb)
        assert np.isnan(z[M * n * plane:]).all(), "wrote past the planes"
        got = z[:M * n * plane].reshape(M, n, sh, sw, R, Mz)
        tol = 3e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", [
    # (H, W, sh, sw, pt, pl, R, Mz): no padding at stride 2 (one border column of one phase, one row of another),
    # padding on every side, unstrided, a row phase wholly outside the input, planes smaller than the input
    (29, 55, 2, 2, 0, 0, 15, 28),
    (9, 11, 2, 2, 2, 1, 8, 8),
    (6, 5, 1, 1, 1, 2, 9, 10),
    (4, 7, 3, 2, 5, 0, 4, 5),
    (12, 15, 2, 2, 1, 0, 5, 6),
])
def test_zero_borders_zero_exactly_the_borders(dtype, geom):
    """``zero_borders`` (the fused SVD layer's, serial) and ``zero_phase_borders`` (parallel) set to zero every
    position of the phase-split planes that no input position maps to, and leave every other one (NaN here) as it
    was, over several blocks of planes."""
    H, W, sh, sw, pt, pl, R, Mz = geom
    nblk = 3
    yr = np.arange(R)[:, None]
    xc = np.arange(Mz)[None, :]
    inside = np.empty((sh, sw, R, Mz), bool)
    for ph in range(sh):
        for pw in range(sw):
            y = yr * sh + ph - pt
            x = xc * sw + pw - pl
            inside[ph, pw] = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    inside = np.broadcast_to(inside, (nblk, sh, sw, R, Mz)).ravel()
    for fn in (GT.zero_borders, GT.zero_phase_borders):
        z = np.full(nblk * sh * sw * R * Mz + 5, np.nan, dtype)
        fn(z, nblk, sh, sw, R, Mz, H, W, pt, pl)
        body = z[:inside.size]
        assert np.isnan(body[inside]).all(), f"{fn.__name__} wrote inside the input's positions"
        assert (body[~inside] == 0).all(), f"{fn.__name__} left a border position"
        assert np.isnan(z[inside.size:]).all(), f"{fn.__name__} wrote past the planes"


_GENERIC_SCRIPT = """
import numpy as np
from npconv.kernels.cpu import gemm as G
from npconv.kernels.cpu._pack import split_row2
from npconv.kernels.cpu.gemm_taps import taps_rows
assert G.tile_shape(np.float32) is None, 'the micro-kernel tile should be off in this build'
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    run = G.TAPS1_BYTES // np.dtype(dt).itemsize
    for OH, OW, Ms in ((4, 37, 40), (6, 5, 9)):          # several runs a row; rows narrower than a run
        offs = np.array([0, 1, Ms, Ms + 2], np.int64)
        coef = rng.standard_normal(4).astype(dt)
        src = rng.standard_normal(3 + (OH + 1) * Ms + 2 * run).astype(dt)
        ref = sum(coef[t] * np.stack([src[3 + offs[t] + oi * Ms:][:OW] for oi in range(OH)]) for t in range(4))
        for slack in (False, True):       # with slack the last run may store past the outputs, within a run
            dst = np.full(2 + OH * OW + run, 7.0, dt)
            taps_rows(coef, src, 3, offs, 4, dst, 2, OH, OW, Ms, np.empty(run, dt), slack)
            assert np.allclose(dst[2:2 + OH * OW].reshape(OH, OW), ref) and (dst[:2] == 7.0).all()
            assert slack or (dst[2 + OH * OW:] == 7.0).all()
    x = rng.standard_normal(55).astype(dt)
    da, db = np.full(30, np.nan, dt), np.full(30, np.nan, dt)
    split_row2(x, 55, 3, da, db)
    row = np.concatenate([np.zeros(3, dt), x, np.zeros(10, dt)])
    assert np.array_equal(da, row[1::2][:30]) and np.array_equal(db, row[0::2][:30])
print('ok')
"""


def test_one_row_tile_and_row_split_in_a_generic_build(tmp_path):
    """``taps_rows`` (on ``gemm.microkernel_taps1``) and ``split_row2`` (on ``_pack.deinterleave2``) serve every CPU,
    the front ends' loop paths included: their 64-byte vectors and masked loads and stores compile for a plain
    x86-64 target (SSE2, no micro-kernel tile) and give the same values."""
    import os
    import subprocess
    import sys
    if "sse2" not in G._target_features():
        pytest.skip("the host cannot run x86-64 SSE2 code")
    env = dict(os.environ, NUMBA_CPU_NAME="x86-64", NUMBA_CPU_FEATURES="+sse,+sse2,+cx16",
               NUMBA_CACHE_DIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
