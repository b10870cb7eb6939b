"""CPU driver of the Winograd F(2x2, 3x3) convolution (kernels in :mod:`npconv.kernels.cpu.winograd`).

Per chunk of images: the input transform ``V`` (16, C, T) of the chunk's T tiles, 16 GEMMs
``M[xi] = U[xi] (F, C) @ V[xi] (C, T)``, and the output transform straight into the NCHW output with the bias. A
layer's GEMMs run on npconv's micro-kernel with the transformed weights ``U`` (16, F, C) packed and kept by the
layer; a functional call's are one batched BLAS ``np.matmul``, with ``U`` computed per call (about 1% of a batch-8
call on AlexNet conv3-5 shapes).

:func:`use_winograd` decides for ``conv2d(..., algorithm="auto")``: 3x3, stride 1, no dilation, no groups, enough
channels for the GEMMs to run at speed, and enough tiles per call for the transforms to pay (see the thresholds).
"""
from __future__ import annotations

import numba
import numpy as np

from .._workspace import WS
from ..kernels.cpu import plan as _PL
from ._prepared import prepared

__all__ = ["use_winograd", "winograd_beats_lanes", "winograd_eligible", "conv2d_winograd_cpu"]

#: workspace bound of the transformed input and output tiles of a chunk, in bytes
_WORKSPACE_BYTES = 48 * 2**20
#: tiles (GEMM columns) per chunk above which a larger chunk stops paying (within ``_WORKSPACE_BYTES``). With the 16
#: products in one parallel region, 2048 against 512 (2-core Zen 4 VM, 2026-11-27, medians of 5 alternating runs,
#: two runs): 384 -> 256 on 13 x 13 at batch 128 1.08x faster twice, 256 -> 384 1.20x and 0.99x, 384 -> 384 at
#: batch 32 1.03x, 256 -> 256 at batch 16 1.11x
_TARGET_TILES = 2048
#: a layer's 16 GEMMs on npconv's micro-kernel (``kernels/cpu/gemm.py``) where the CPU has one; a module constant for
#: same-process comparisons, not a user setting
USE_MICROKERNEL = True
#: "auto" uses Winograd from this many input and output channels ...
MIN_CHANNELS = 32
#: ... and this many 2x2 output tiles per call (below, the GEMMs are too narrow and im2col + GEMM is as fast)
MIN_TILES = 192
#: Where the lanes kernel (``_lanes.py``) can run the conv, "auto" takes Winograd from this many input and output
#: channels ...
LANES_MIN_CHANNELS = 128
#: ... and this many tiles per call (one 11 x 11 output), instead of ``MIN_CHANNELS`` and ``MIN_TILES``. 2-core Zen 4
#: VM, float32, same process, lanes time / Winograd time with the vectorised input transform (2026-11-27; the host's
#: phases move single figures by 10-20%): 128 channels on 16 x 16 1.37-1.41 at batch 1, 1.10 at 2, 1.04 at 8; on
#: 32 x 32 1.39 at 1, 1.14 at 4, 1.27 at 8; 256 -> 384 on 13 x 13 1.11-1.14 at 1, 0.94 at 2, 1.14 at 4, 1.43 at 8;
#: 384 -> 256 1.04-1.16, 0.93, 1.05, 1.49; 256 on 14 x 14 1.14 and 1.12 at batches 1 and 2; 64 channels on 32 x 32
#: 1.16 at 1 but 0.74 at 8 (hence 128).
LANES_MIN_TILES = 32


def winograd_beats_lanes(x_shape, w_shape, stride, dilation, groups, out_hw):
    """Whether "auto" prefers Winograd to the lanes kernel: eligible, with ``LANES_MIN_CHANNELS`` channels in and
    out and ``LANES_MIN_TILES`` tiles."""
    if not winograd_eligible(w_shape, stride, dilation, groups):
        return False
    N, C = x_shape[:2]
    tiles = N * (-(-out_hw[0] // 2)) * (-(-out_hw[1] // 2))
    return min(C, w_shape[0]) >= LANES_MIN_CHANNELS and tiles >= LANES_MIN_TILES


def winograd_eligible(w_shape, stride, dilation, groups):
    """Whether the Winograd F(2x2, 3x3) path can run this convolution at all."""
    return (tuple(w_shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1)


def use_winograd(x_shape, w_shape, stride, dilation, groups, out_hw):
    """The ``algorithm="auto"`` choice: Winograd where it is eligible and measured faster than im2col + GEMM."""
    if not winograd_eligible(w_shape, stride, dilation, groups):
        return False
    N, C = x_shape[:2]
    F = w_shape[0]
    tiles = N * (-(-out_hw[0] // 2)) * (-(-out_hw[1] // 2))
    return min(C, F) >= MIN_CHANNELS and tiles >= MIN_TILES


def _stride(n):
    """Stride (items) between the 16 transformed matrices of n items each: n rounded up to a multiple of 16, plus
    16, so that consecutive matrices start 64 items (one or two cache lines) past a 4 KiB multiple of each other."""
    return -(-n // 16) * 16 + 16


def _stack(buf, stride, rows, cols):
    """The (16, rows, cols) view of the 16 matrices in a flat buffer, ``stride`` items apart (for the GEMMs)."""
    return buf[:16 * stride].reshape(16, stride)[:, :rows * cols].reshape(16, rows, cols)


def conv2d_winograd_cpu(x, w, bias, pad, OH, OW, out=None, prep=None):
    """``conv2d`` of contiguous ``x`` (N, C, H, W) by 3x3 ``w`` (F, C, 3, 3), stride 1, padding ``pad``
    (top, bottom, left, right) to an (OH, OW) output; ``bias`` (F,) or None. Geometry already validated.
    ``prep``: a layer's per-dtype parameter cache, where the 16 GEMMs' packed weights are kept for npconv's GEMM
    micro-kernel (``USE_MICROKERNEL``); without it the GEMMs are one batched BLAS ``np.matmul``."""
    from ..kernels.cpu import winograd as KW
    N, C = x.shape[:2]
    F = w.shape[0]
    dt = x.dtype
    TH = -(-OH // 2)
    TW = -(-OW // 2)
    TT = TH * TW
    per_img = 16 * (C + F) * TT * dt.itemsize
    chunk = max(1, min(N, -(-_TARGET_TILES // TT), _WORKSPACE_BYTES // max(per_img, 1)))
    su = _stride(F * C)
    u_buf = WS.get("wino.U", 16 * su, dt)

    def transformed():
        KW.weight_transform(w, u_buf, su)
        return _stack(u_buf, su, F, C)

    packs = tile = U = None
    if USE_MICROKERNEL and prep is not None:
        from ..kernels.cpu import gemm as KG
        tile = KG.tile_shape(dt)
    if tile is not None:
        # the transformed weights, packed (the 16 one after the other), kept by the layer: no weight transform on
        # later calls
        packs = prepared(prep, ("cpu-wino-mk", dt), lambda: np.concatenate([KG.pack_a(u, tile[1])
                                                                            for u in transformed()]))
    else:
        U = transformed()
    sv_max = _stride(C * chunk * TT)
    sm_max = _stride(F * chunk * TT)
    v_buf = WS.get("wino.V", 16 * sv_max + 64, dt)      # + the micro-kernel's readable slack past the last V
    m_buf = WS.get("wino.M", 16 * sm_max, dt)
    nth = numba.get_num_threads()
    srow = (2 * TH + 2) * (2 * TW + 2) + 4 * (2 * TW + 2)
    scratch = WS.get("wino.scratch", nth * srow, dt).reshape(nth, srow)
    has_b = bias is not None
    b = bias if has_b else np.zeros(1, dt)
    if out is None:
        out = np.empty((N, F, OH, OW), dt)
    for n0 in range(0, N, chunk):
        m = min(chunk, N - n0)
        T = m * TT
        sv = _stride(C * T)
        sm = _stride(F * T)
        _PL.run(KW.input_transform, x, n0, m, pad[0], pad[2], TH, TW, v_buf, T, sv, scratch)
        if packs is not None:
            # the 16 products in one parallel region
            KG.matmul(packs, F, C, tile, v_buf, T, T, m_buf, batch=(16, packs.shape[0] // 16, sv, sm))
        else:
            np.matmul(U, _stack(v_buf, sv, C, T), out=_stack(m_buf, sm, F, T))
        _PL.run(KW.output_transform, m_buf, T, sm, n0, m, TH, TW, b, has_b, out)
    if packs is not None:
        _PL.complete(out)       # the whole work: kernel calls (kernels/cpu/plan.py); not so with np.matmul
    return out


_PL.watch(__name__)
