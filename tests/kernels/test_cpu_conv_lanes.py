"""The lanes kernel (``kernels/cpu/conv_lanes.py``) against float64 loops: the input planes it reads, every tile
height, partial last tiles of a row and partial last filter blocks, strides, dilations, padding, several images;
outputs it must not write are poisoned with NaN."""
import numpy as np
import pytest

from npconv.kernels.cpu import conv_lanes as KL
from npconv.kernels.cpu import gemm as KG
from tests.reference import conv2d_naive, tolerance

pytestmark = pytest.mark.skipif(KL.lanes_tile(np.float32) is None,
                                reason="the lanes kernel needs AVX-512 (32 vector registers)")

DTYPES = [np.float32, np.float64]


def _planes(x, pt, pl, sw, Hp, Wq):
    """The layout of ``pack_lanes_input`` built with NumPy: zero-padded planes, one per column phase."""
    N, C, H, W = x.shape
    width = Wq * sw
    xp = np.zeros((N, C, max(Hp, pt + H), max(width, pl + W)), x.dtype)
    xp[:, :, pt:pt + H, pl:pl + W] = x
    xp = xp[:, :, :Hp, :width]                                       # rows/columns past the planes: never read
    return np.ascontiguousarray(xp.reshape(N, C, Hp, Wq, sw).transpose(0, 1, 4, 2, 3)).ravel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sw,pt,pl,Hp,Wq", [(1, 1, 2, 9, 12), (2, 0, 1, 6, 5), (3, 2, 0, 12, 4), (2, 3, 3, 4, 9)])
def test_pack_lanes_input_is_the_padded_phase_split_planes(rng, dtype, sw, pt, pl, Hp, Wq):
    x = rng.standard_normal((2, 3, 7, 8)).astype(dtype)
    xq = np.full(2 * 3 * Hp * sw * Wq, np.nan, dtype)
    KL.pack_lanes_input(x, pt, pl, sw, Hp, Wq, xq)
    np.testing.assert_array_equal(xq, _planes(x, pt, pl, sw, Hp, Wq))


def test_lanes_rows_fits_the_row():
    # the tile height computing the fewest positions of a row, the tallest on a tie
    assert [KL.lanes_rows(ow) for ow in (1, 3, 4, 7, 13, 16, 26, 27, 28, 32, 55, 110, 15, 29)] == \
        [4, 4, 4, 7, 13, 8, 13, 9, 14, 8, 11, 11, 5, 10]


def _run(x, w, b, stride, pad, dilation, MR, nchunk=3):
    """The kernel as the functional driver sets it up (written out here from the layout's definition)."""
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    OH = (H + pad[0] + pad[1] - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pad[2] + pad[3] - dw * (KW - 1) - 1) // sw + 1
    VW, NV = KL.lanes_tile(x.dtype)
    NR = VW * NV
    Hp = (OH - 1) * sh + (KH - 1) * dh + 1
    Wq = -(-OW // MR) * MR + ((KW - 1) * dw) // sw
    xq = _planes(x, pad[0], pad[2], sw, Hp, Wq)
    c, kh, kw = np.meshgrid(np.arange(C), np.arange(KH), np.arange(KW), indexing="ij")
    koff = (((c * sw + kw * dw % sw) * Hp + kh * dh) * Wq + kw * dw // sw).ravel().astype(np.int64)
    koff.flags.writeable = False     # read-only, as the layer's cached offsets (a writable array: a second compile)
    out = np.full(N * F * OH * OW + 7, np.nan, x.dtype)            # NaN: anything not written shows
    has_b = b is not None
    KL.conv_lanes(KG.pack_a(w.reshape(F, -1), NR), F, C * KH * KW, NR, MR, xq, C * Hp * sw * Wq, koff, OH, OW,
                  sh * Wq, N, out, b if has_b else np.zeros(1, x.dtype), has_b, nchunk)
    assert np.isnan(out[N * F * OH * OW:]).all()                    # nothing past the output
    return out[:N * F * OH * OW].reshape(N, F, OH, OW)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("MR", KL.LANES_ROWS)
def test_every_tile_height(rng, dtype, MR):
    # rows of MR + 3 positions: a whole tile and a partial one; F across a filter block's edge
    NR = np.prod(KL.lanes_tile(dtype))
    F = NR + 3
    x = rng.standard_normal((1, 3, 6, MR + 5)).astype(dtype)
    w = rng.standard_normal((F, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    y = _run(x, w, b, (1, 1), (1, 0, 0, 0), (1, 1), MR)
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, (1, 1), (1, 0, 0, 0)), *tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,pad,dilation,MR", [
    ((2, 2), (0, 0, 0, 0), (1, 1), 13),          # ZF conv2-like: stride 2, no padding
    ((2, 3), (2, 1, 0, 3), (1, 1), 5),            # uneven strides and padding
    ((1, 2), (1, 1, 2, 2), (2, 3), 7),            # dilation across the column phases
    ((3, 1), (0, 2, 1, 0), (1, 2), 4),
])
@pytest.mark.parametrize("bias", [True, False])
def test_strides_dilations_padding_images(rng, dtype, stride, pad, dilation, MR, bias):
    x = rng.standard_normal((3, 5, 15, 17)).astype(dtype)
    w = rng.standard_normal((9, 5, 3, 4)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype) if bias else None
    for nchunk in (1, 4, 1000):                  # one job a filter block, several, more than tiles
        y = _run(x, w, b, stride, pad, dilation, MR, nchunk)
        np.testing.assert_allclose(y, conv2d_naive(x, w, b, stride, pad, dilation), *tolerance(dtype))
