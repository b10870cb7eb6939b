"""The dense CPU convolution with the filters in the vector lanes: the Python side of ``kernels.cpu.conv_lanes``.

No patch matrix and no padded positions: a register tile is a run of one output row's positions (4 to 14, chosen
to fit the row) by 32 filters (16 in float64), the positions broadcast from the input planes in place and the
whole reduction in the registers. It serves ``conv2d(algorithm="lanes")`` and, for convs with many taps per filter
at any batch size, ``algorithm="auto"`` (:func:`use_lanes`): im2col + GEMM pays for its patch matrix and for its
panels' padding, the direct kernel and the implicit GEMMs for their padded positions (docs/conv.md).
"""
from __future__ import annotations

import functools

import numba
import numpy as np

from .._workspace import WS
from ..kernels.cpu import plan as PL
from ._prepared import prepared

__all__ = ["lanes_eligible", "use_lanes", "conv2d_lanes_cpu"]

#: ``algorithm="auto"`` takes the lanes kernel for convs of at least this many multiply-adds per output value
#: (channels x taps; below it the copy of each tile into the output planes weighs; see :func:`use_lanes`) ...
LANES_MIN_TAPS = 512
#: ... and at least this many multiply-adds in all (below it the call's fixed costs dominate either way)
LANES_MIN_MACS = 1 << 20
#: images a call packs and runs at a time: their input planes (``pack_lanes_input``) stay under this many bytes
CHUNK_BYTES = 8 * 2**20


def lanes_eligible(dtype, groups):
    """Whether the lanes kernel can run a conv: one group, on a CPU with its register tile (AVX-512)."""
    from ..kernels.cpu.conv_lanes import lanes_tile
    return groups == 1 and lanes_tile(dtype) is not None


def use_lanes(x_shape, w_shape, dtype, groups, out_hw):
    """Whether ``conv2d(algorithm="auto")`` runs the lanes kernel: eligible, a kernel larger than 1x1, deep and
    large enough (``LANES_MIN_*``). (``auto_algorithm`` asks Winograd first, where it is faster still.)"""
    if not lanes_eligible(dtype, groups):
        return False
    N = x_shape[0]
    F, C, KH, KW = w_shape
    taps = C * KH * KW
    return KH * KW > 1 and taps >= LANES_MIN_TAPS and N * F * out_hw[0] * out_hw[1] * taps >= LANES_MIN_MACS


@functools.lru_cache(maxsize=64)
def _tap_offsets(C, KH, KW, dh, dw, sw, Hp, Wq):
    """Each tap's (channel, kernel row, kernel column) offset from its position's base in the planes of
    ``pack_lanes_input``: per channel ``sw`` phase planes of ``Hp`` rows of ``Wq`` values."""
    c, kh, kw = np.meshgrid(np.arange(C), np.arange(KH), np.arange(KW), indexing="ij")
    col = kw * dw
    off = ((c * sw + col % sw) * Hp + kh * dh) * Wq + col // sw
    off = np.ascontiguousarray(off.ravel().astype(np.int64))
    off.flags.writeable = False          # shared by the cache
    return off


def conv2d_lanes_cpu(x, w, b, stride, pad, dilation, OH, OW, out=None, prep=None):
    """The conv (``w`` (F, C, KH, KW), one group) on the lanes kernel; arguments validated and normalised as
    ``conv2d`` passes them (``pad`` a 4-tuple). ``prep``: a layer's per-dtype cache for the packed weights."""
    from ..kernels.cpu import gemm as KG
    from ..kernels.cpu import conv_lanes as KL
    x = np.ascontiguousarray(x)
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    sh, sw = stride
    dh, dw = dilation
    dt = x.dtype
    VW, NV = KL.lanes_tile(dt)
    NR = VW * NV
    MR = KL.lanes_rows(OW)
    Hp = (OH - 1) * sh + (KH - 1) * dh + 1
    # plane width: every column a tile reads, ox + (kw*dw)//sw for ox < ceil(OW/MR)*MR (the last tile of a row
    # computes positions past OW, from zeros or input columns no output uses, and does not store them)
    Wq = -(-OW // MR) * MR + ((KW - 1) * dw) // sw
    koff = _tap_offsets(C, KH, KW, dh, dw, sw, Hp, Wq)
    ximg = C * Hp * sw * Wq
    m = max(1, min(N, CHUNK_BYTES // (ximg * dt.itemsize)))
    xq = WS.get("conv.lanes", m * ximg, dt)
    wp = prepared(prep, ("cpu-conv-lanes", dt), lambda: KG.pack_a(w.reshape(F, C * KH * KW), NR))
    if out is None:
        out = np.empty((N, F, OH, OW), dt)
    has_b = b is not None
    bias = np.ascontiguousarray(b) if has_b else np.zeros(1, dt)
    nfb = -(-F // NR)
    outf = out.reshape(-1)
    for n0 in range(0, N, m):
        n1 = min(N, n0 + m)
        PL.run(KL.pack_lanes_input, x[n0:n1], pad[0], pad[2], sw, Hp, Wq, xq)
        ntile = (n1 - n0) * OH * -(-OW // MR)
        # enough jobs for 4 a thread (the threads take equal runs of jobs in order)
        nchunk = max(1, min(ntile, -(-4 * numba.get_num_threads() // nfb)))
        PL.run(KL.conv_lanes, wp, F, C * KH * KW, NR, MR, xq, ximg, koff, OH, OW, sh * Wq, n1 - n0,
               outf[n0 * F * OH * OW:n1 * F * OH * OW], bias, has_b, nchunk)
    PL.complete(out)        # the whole work: kernel calls (a batch in several chunks is not planned: x in parts)
    return out


PL.watch(__name__)
