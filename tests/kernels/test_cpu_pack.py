"""The CPU packing helpers (``npconv.kernels.cpu._pack``) against element-by-element definitions."""
import numpy as np
import pytest

from npconv.kernels.cpu import gemm as G
from npconv.kernels.cpu._pack import pack_plane, pack_plane_ahead, split_row2


def _padded(xin, pt, pl, rows, cols):
    """x zero-padded by pt rows on top and pl columns on the left, cut or zero-extended to (rows, cols)."""
    out = np.zeros((rows, cols), xin.dtype)
    for r in range(rows):
        for c in range(cols):
            i, j = r - pt, c - pl
            if 0 <= i < xin.shape[0] and 0 <= j < xin.shape[1]:
                out[r, c] = xin[i, j]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("W", [1, 2, 5, 8, 33, 40, 55, 97])
@pytest.mark.parametrize("pl", [0, 1, 2, 3, 5, 34])
@pytest.mark.parametrize("M", [1, 3, 17, 24, 32, 50])
def test_split_row2(rng, dtype, W, pl, M):
    """Rows shorter and longer than a vector of each phase (16 float32, 8 float64 values), left padding of more than
    a vector (pl = 34), outputs that cut the row (M < W / 2) or end in zeros; the writes stay within da and db, and the
    values past the row (NaN here) are never used."""
    buf = np.full(W + 64, np.nan, dtype)
    buf[:W] = rng.standard_normal(W)
    src = buf[:W]
    out = np.full((2, M + 40), 7.0, dtype)
    da, db = out[0, :M], out[1, :M]
    split_row2(src, W, pl, da, db)
    row = _padded(src[None], 0, pl, 1, 2 * M + 2)[0]
    # da is column phase pl % 2 of the padded row, db the other phase
    np.testing.assert_array_equal(da, row[pl % 2::2][:M])
    np.testing.assert_array_equal(db, row[1 - pl % 2::2][:M])
    assert (out[:, M:] == 7.0).all()


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("sh,sw", [(1, 1), (2, 2), (2, 1), (1, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("pt,pl", [(0, 0), (1, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("H,W", [(7, 9), (10, 6), (4, 15)])
def test_pack_plane(rng, sh, sw, pt, pl, H, W, ahead):
    """Every branch (the small unstrided plane, unit, stride-2 and other column strides); ``pack_plane_ahead``, which
    fetches the rows of the last plane of a flat batch meanwhile, packs the same values and leaves that batch as it
    was."""
    xin = rng.standard_normal((H, W)).astype(np.float32)
    R, M = 6, 9
    dst = np.full((sh, sw, R, M), np.nan, np.float32)
    if ahead:
        batch = rng.standard_normal(3 * H * W).astype(np.float32)
        before = batch.copy()
        pack_plane_ahead(xin, pt, pl, sh, sw, dst, batch, 2 * H * W)
        np.testing.assert_array_equal(batch, before)
    else:
        pack_plane(xin, pt, pl, sh, sw, dst)
    xp = _padded(xin, pt, pl, R * sh + sh, M * sw + sw)
    for p in range(sh):
        for q in range(sw):
            np.testing.assert_array_equal(dst[p, q], xp[p::sh, q::sw][:R, :M])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_plane_ahead_fetches(rng, dtype):
    """A row's fetch is emitted (a read prefetch: ``prefetcht1`` on x86; checked in a fresh, uncached caller, whose
    code can be inspected) and changes nothing; with a negative offset (no plane to fetch, a one-value placeholder) the
    packing is ``pack_plane``'s, in float64 too."""
    import numba

    from npconv.kernels.cpu._pack import _fetch_row

    @numba.njit
    def fetch(a, off, ih, W):
        _fetch_row(a, off, ih, W)

    a = np.arange(400).astype(dtype)
    fetch(a, 100, 2, 55)
    np.testing.assert_array_equal(a, np.arange(400).astype(dtype))
    if "sse" in G._target_features():
        assert "prefetcht1" in "\n".join(fetch.inspect_asm().values())
    xin = rng.standard_normal((11, 55)).astype(dtype)
    got = np.full((2, 2, 6, 28), np.nan, dtype)
    ref = got.copy()
    pack_plane_ahead(xin, 1, 0, 2, 2, got, np.zeros(1, dtype), -1)
    pack_plane(xin, 1, 0, 2, 2, ref)
    np.testing.assert_array_equal(got, ref)
