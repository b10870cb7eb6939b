"""Biclustered convolutions executed as their factors (paper section 4.4), and the shared-separable variant.

The factor layout is the one of :mod:`npconv.decompose.bicluster` and :mod:`npconv.decompose.shared`: the input
channels in group order are ``in_perm`` with group ``g`` at ``in_perm[in_offsets[g]:in_offsets[g+1]]``; the
output channels likewise with ``out_perm`` / ``out_offsets``; stacked factor rows follow the permuted order.

* :func:`bicluster_cp_conv2d` -- per block (g, h), K rank-1 components: gather the input group, C_g -> K 1x1
  reduction, vertical X x 1 pass (row stride), horizontal 1 x Y pass (column stride), K -> F_h 1x1 expansion
  added into the output group.
* :func:`bicluster_svd_conv2d` -- per block: C_g -> K1 1x1 reduction, X x Y conv K1 -> K2, K2 -> F_h expansion.
* :func:`shared_separable_conv2d` -- as CP, but the blocks' separable filters come from a shared collection:
  each input channel of a group is filtered once per shared filter the group uses, and every component is a
  C_g-term combination of those filtered maps (the reduction moves after the spatial filtering).
* :func:`bicluster_conv2d` -- either of the first two, chosen by the number of factor arrays (8: CP, 7: SVD),
  so ``bicluster_conv2d(x, *result)`` runs a decomposition result directly.

CPU (NumPy): numba kernels + matrix products (npconv's GEMM micro-kernel where the CPU has AVX2 or AVX-512, else
BLAS), over chunks of the batch so the workspace stays bounded (``_WORKSPACE_BYTES``). The expansion of output
group h is ONE product ``expand_h (F_h, G*K) @ Z_h (G*K, chunk*P)``, stored into the group's output channels;
the CP front end (reduction + both spatial passes) is one fused numba kernel parallel over groups (where the
micro-kernel has its 12-row tile and the reduction folds into the horizontal taps, the two as an implicit GEMM over
a group's components: ``kernels/cpu/cp_front_gemm.py``); the SVD
form is three GEMM stages, the middle one (the blocks' K1 -> K2 convolutions) an implicit GEMM over the reduced
channels' phase-split planes where the micro-kernel has its 12-row AVX-512 tile (``kernels/cpu/gemm_taps.py``),
else a channel-major im2col and a GEMM. Where the micro-kernel has its 12-row AVX-512 tile the three forms run fused
instead: one parallel pass over the batch whose jobs (an image's band of output rows) expand what they have just
made, from their thread's buffers
(``kernels/cpu/cp_fused.py``, ``kernels/cpu/svd_fused.py``, ``kernels/cpu/shared_gemm.py``).

GPU (CuPy): dedicated kernels, :mod:`npconv.kernels.cuda.ops_bicluster` (a fused CP front end, the SVD block conv,
the shared-filter passes; cuBLAS expansion GEMMs and a scatter by ``out_perm``). The composed paths
(``_cp_composed`` ...: :func:`npconv.functional.conv2d` calls with gathers/transposes, on NumPy or CuPy) are the
reference the tests compare against, and the GPU fallback for kernels too large for the dedicated tiles.
"""
from __future__ import annotations

import collections
import functools

import numba
import numpy as np

from .._backend import get_array_module, is_cupy_array, to_numpy
from .._workspace import WS
from ..kernels.cpu import plan as PL
from .._validate import (as_pair, as_padding4, check_array, check_float_array, check_out, check_same_dtype, fill_out,
                         out_size)
from ._prepared import prepared
from .conv import conv2d

__all__ = ["bicluster_conv2d", "bicluster_cp_conv2d", "bicluster_svd_conv2d", "shared_separable_conv2d"]

#: workspace bound per call (packed input, component maps, GEMM staging), in bytes
_WORKSPACE_BYTES = 32 * 2**20
#: GEMM columns (chunk * output positions) above which batching more images into one chunk stops paying
_TARGET_COLUMNS = 2048
#: a chunk's intermediates stay within this size: 16 MiB measured 1.1-1.26x faster than 4 MiB at batch 64 on the
#: ZF conv2/conv3/conv5 and CIFAR conv2 shapes (CP, SVD and shared forms; interleaved runs), 8-32 MiB within 5%
_CACHE_BYTES = 16 * 2**20
#: ... and for the CP and shared forms this smaller bound: ZF conv2 at batch 128 (2 cores, 32 MiB L3, eleventh
#: session, interleaved): CP K=8 93.2 -> 86.8 ms, K=12 124.4 -> 119.0, K=6 72.9 -> 68.5, shared 62.4 -> 60.7 (two
#: images a chunk instead of three or four); the SVD form measured 1.5% slower with it and keeps _CACHE_BYTES
_CP_CACHE_BYTES = 12 * 2**20
#: the CP front end's jobs pack their own input group when it is at most this large
_OWN_PACK_BYTES = 128 * 2**10
#: readable values past the component maps: the micro-kernel's last column panel loads whole vectors
_SLACK = 64
#: the expansion GEMMs on npconv's micro-kernel (``kernels/cpu/gemm.py``) where the CPU has one, else BLAS; a module
#: constant for same-process comparisons, not a user setting
USE_MICROKERNEL = True


# --------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------
def _check_groups(perm, offsets, n, name):
    """Validate one side's groups; return the offsets as a host int64 array."""
    from ..kernels.cpu.bicluster import group_check
    check_array(perm, f"{name}_perm", ndim=1)
    check_array(offsets, f"{name}_offsets", ndim=1)
    for nm, a in ((f"{name}_perm", perm), (f"{name}_offsets", offsets)):
        if a.dtype.kind not in "iu":
            raise TypeError(f"{nm} must be an integer array, got dtype {a.dtype}")
    if perm.shape[0] != n:
        raise ValueError(f"{name}_perm must have {n} entries (one per channel), got {perm.shape[0]}")
    ph = np.ascontiguousarray(to_numpy(perm), dtype=np.int64)
    off = np.ascontiguousarray(to_numpy(offsets), dtype=np.int64)
    code = group_check(ph, off, n)
    if code == 1:
        raise ValueError(f"{name}_perm must be a permutation of range({n})")
    if code == 2:
        raise ValueError(f"{name}_offsets must rise strictly from 0 to {n} (non-empty groups), got {off.tolist()}")
    return off


def _check_common(x, in_perm, in_offsets, out_perm, out_offsets, bias, stride, padding, factors, C_rows, F_rows):
    check_float_array(x, "x", ndim=4)
    for nm, a in factors.items():
        check_float_array(a, nm)
    check_same_dtype("x", x, **factors)
    if bias is not None:
        check_float_array(bias, "bias", ndim=1)
        check_same_dtype("x", x, bias=bias)
    N, C, Hin, Win = x.shape
    if C_rows != C:
        raise ValueError(f"the factors are for {C_rows} input channels, but x has {C} (x.shape {tuple(x.shape)})")
    in_off = _check_groups(in_perm, in_offsets, C, "in")
    out_off = _check_groups(out_perm, out_offsets, F_rows, "out")
    if bias is not None and bias.shape[0] != F_rows:
        raise ValueError(f"bias must have shape ({F_rows},), got {tuple(bias.shape)}")
    stride = as_pair(stride, "stride")
    pad = as_padding4(padding)
    return in_off, out_off, stride, pad


def _geometry(x, X, Y, stride, pad):
    OH = out_size(x.shape[2], X, stride[0], pad[0], pad[1], what="output height")
    OW = out_size(x.shape[3], Y, stride[1], pad[2], pad[3], what="output width")
    return OH, OW


def _validate_cp(x, in_perm, in_offsets, reduce, vertical, horizontal, expand, out_perm, out_offsets, bias,
                 stride, padding):
    for nm, a, nd in (("reduce", reduce, 3), ("vertical", vertical, 4), ("horizontal", horizontal, 4),
                      ("expand", expand, 3)):
        check_array(a, nm, ndim=nd)
    C, H, K = reduce.shape
    G = vertical.shape[0]
    if vertical.shape[:3] != (G, H, K):
        raise ValueError(f"vertical must have shape (G, {H}, {K}, X) to match reduce {tuple(reduce.shape)}, "
                         f"got {tuple(vertical.shape)}")
    if horizontal.shape[:3] != (G, H, K):
        raise ValueError(f"horizontal must have shape ({G}, {H}, {K}, Y), got {tuple(horizontal.shape)}")
    if expand.shape[1:] != (G, K):
        raise ValueError(f"expand must have shape (F, {G}, {K}), got {tuple(expand.shape)}")
    in_off, out_off, stride, pad = _check_common(
        x, in_perm, in_offsets, out_perm, out_offsets, bias, stride, padding,
        dict(reduce=reduce, vertical=vertical, horizontal=horizontal, expand=expand), C, expand.shape[0])
    if in_off.shape[0] - 1 != G:
        raise ValueError(f"in_offsets must describe {G} input groups (vertical.shape[0]), got {in_off.shape[0] - 1}")
    if out_off.shape[0] - 1 != H:
        raise ValueError(f"out_offsets must describe {H} output groups (reduce.shape[1]), got {out_off.shape[0] - 1}")
    if min(vertical.shape[3], horizontal.shape[3]) < 1:
        raise ValueError("vertical and horizontal must have at least one tap")
    OH, OW = _geometry(x, vertical.shape[3], horizontal.shape[3], stride, pad)
    return in_off, out_off, stride, pad, OH, OW


def _validate_svd(x, in_perm, in_offsets, reduce, spatial, expand, out_perm, out_offsets, bias, stride, padding):
    check_array(reduce, "reduce", ndim=3)
    check_array(spatial, "spatial", ndim=6)
    check_array(expand, "expand", ndim=3)
    C, H, K1 = reduce.shape
    G, _, K2 = spatial.shape[:3]
    if spatial.shape[1] != H or spatial.shape[3] != K1:
        raise ValueError(f"spatial must have shape (G, {H}, K2, {K1}, X, Y) to match reduce {tuple(reduce.shape)}, "
                         f"got {tuple(spatial.shape)}")
    if expand.shape[1:] != (G, K2):
        raise ValueError(f"expand must have shape (F, {G}, {K2}), got {tuple(expand.shape)}")
    in_off, out_off, stride, pad = _check_common(
        x, in_perm, in_offsets, out_perm, out_offsets, bias, stride, padding,
        dict(reduce=reduce, spatial=spatial, expand=expand), C, expand.shape[0])
    if in_off.shape[0] - 1 != G:
        raise ValueError(f"in_offsets must describe {G} input groups (spatial.shape[0]), got {in_off.shape[0] - 1}")
    if out_off.shape[0] - 1 != H:
        raise ValueError(f"out_offsets must describe {H} output groups (reduce.shape[1]), got {out_off.shape[0] - 1}")
    OH, OW = _geometry(x, spatial.shape[4], spatial.shape[5], stride, pad)
    return in_off, out_off, stride, pad, OH, OW


def _validate_shared(x, in_perm, in_offsets, reduce, assign, vertical, horizontal, expand, out_perm, out_offsets,
                     bias, stride, padding):
    check_array(reduce, "reduce", ndim=3)
    check_array(assign, "assign", ndim=3)
    check_array(vertical, "vertical", ndim=2)
    check_array(horizontal, "horizontal", ndim=2)
    check_array(expand, "expand", ndim=3)
    if assign.dtype.kind not in "iu":
        raise TypeError(f"assign must be an integer array, got dtype {assign.dtype}")
    C, H, K = reduce.shape
    G = assign.shape[0]
    S = vertical.shape[0]
    if assign.shape != (G, H, K):
        raise ValueError(f"assign must have shape (G, {H}, {K}), got {tuple(assign.shape)}")
    if horizontal.shape[0] != S:
        raise ValueError(f"horizontal must have {S} rows like vertical, got {horizontal.shape[0]}")
    if expand.shape[1:] != (G, K):
        raise ValueError(f"expand must have shape (F, {G}, {K}), got {tuple(expand.shape)}")
    a = to_numpy(assign)
    if a.size and (a.min() < 0 or a.max() >= S):
        raise ValueError(f"assign must index the {S} shared filters, got values in [{a.min()}, {a.max()}]")
    in_off, out_off, stride, pad = _check_common(
        x, in_perm, in_offsets, out_perm, out_offsets, bias, stride, padding,
        dict(reduce=reduce, vertical=vertical, horizontal=horizontal, expand=expand), C, expand.shape[0])
    if in_off.shape[0] - 1 != G:
        raise ValueError(f"in_offsets must describe {G} input groups (assign.shape[0]), got {in_off.shape[0] - 1}")
    if out_off.shape[0] - 1 != H:
        raise ValueError(f"out_offsets must describe {H} output groups (reduce.shape[1]), got {out_off.shape[0] - 1}")
    OH, OW = _geometry(x, vertical.shape[1], horizontal.shape[1], stride, pad)
    return in_off, out_off, stride, pad, OH, OW


# --------------------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------------------
def bicluster_cp_conv2d(x, in_perm, in_offsets, reduce, vertical, horizontal, expand, out_perm, out_offsets,
                        bias=None, *, stride=1, padding=0, out=None):
    """Biclustered CP convolution of ``x`` (N, C, H, W) executed as its factors.

    Parameters
    ----------
    in_perm (C,), in_offsets (G+1,), out_perm (F,), out_offsets (H+1,) : integer arrays, the groups
    reduce : (C, H, K)  input factor, rows in ``in_perm`` order
    vertical : (G, H, K, X), horizontal : (G, H, K, Y)  the separable spatial factors
    expand : (F, G, K)  output factor (CP weights folded in), rows in ``out_perm`` order
    bias : (F,) or None, in the original output-channel order
    stride, padding : as :func:`npconv.functional.conv2d` (padding int, pair or 4-tuple)
    out : array, optional
        Where to write the result (see :func:`npconv.functional.conv2d`'s ``out``).

    Returns (N, F, OH, OW) in x's dtype (``out`` when given); all float arrays must share x's dtype. NumPy or
    CuPy arrays.
    """
    xp = get_array_module(x, reduce, vertical, horizontal, expand, bias)
    in_off, out_off, stride, pad, OH, OW = _validate_cp(x, in_perm, in_offsets, reduce, vertical, horizontal,
                                                         expand, out_perm, out_offsets, bias, stride, padding)
    _check_out(out, x, OH, OW, expand, (reduce, vertical, horizontal, expand, bias))
    if xp is not np:
        return fill_out(_cp_gpu(x, in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, out_off, bias,
                                stride, pad), out)
    return _cp_cpu(x, in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, out_off, bias, stride,
                   pad, OH, OW, out)


def bicluster_svd_conv2d(x, in_perm, in_offsets, reduce, spatial, expand, out_perm, out_offsets, bias=None, *,
                         stride=1, padding=0, out=None):
    """Biclustered two-stage-SVD convolution of ``x`` (N, C, H, W) executed as its factors.

    ``reduce`` (C, H, K1), ``spatial`` (G, H, K2, K1, X, Y), ``expand`` (F, G, K2); groups, bias, stride,
    padding and ``out`` as :func:`bicluster_cp_conv2d`.
    """
    xp = get_array_module(x, reduce, spatial, expand, bias)
    in_off, out_off, stride, pad, OH, OW = _validate_svd(x, in_perm, in_offsets, reduce, spatial, expand,
                                                          out_perm, out_offsets, bias, stride, padding)
    _check_out(out, x, OH, OW, expand, (reduce, spatial, expand, bias))
    if xp is not np:
        return fill_out(_svd_gpu(x, in_perm, in_off, reduce, spatial, expand, out_perm, out_off, bias, stride, pad),
                        out)
    return _svd_cpu(x, in_perm, in_off, reduce, spatial, expand, out_perm, out_off, bias, stride, pad, OH, OW, out)


def shared_separable_conv2d(x, in_perm, in_offsets, reduce, assign, vertical, horizontal, expand, out_perm,
                            out_offsets, bias=None, *, stride=1, padding=0, out=None):
    """Biclustered CP convolution whose separable filters come from a shared collection, executed shared.

    ``reduce`` (C, H, K) combination weights (rows in ``in_perm`` order), ``assign`` (G, H, K) integer index of
    each component's shared filter, ``vertical`` (S, X) and ``horizontal`` (S, Y) the shared filters,
    ``expand`` (F, G, K); groups, bias, stride, padding, ``out`` as :func:`bicluster_cp_conv2d`. Component (g, h, k) is
    ``sum_{j in g} reduce[j, h, k] * (horizontal[s] * (vertical[s] * x_j))`` with ``s = assign[g, h, k]``; the
    filtered maps are computed once per (input channel, shared filter used by the group).
    """
    xp = get_array_module(x, reduce, vertical, horizontal, expand, bias)
    in_off, out_off, stride, pad, OH, OW = _validate_shared(x, in_perm, in_offsets, reduce, assign, vertical,
                                                             horizontal, expand, out_perm, out_offsets, bias,
                                                             stride, padding)
    _check_out(out, x, OH, OW, expand, (reduce, vertical, horizontal, expand, bias))
    if xp is not np:
        return fill_out(_shared_gpu(x, in_perm, in_off, reduce, assign, vertical, horizontal, expand, out_perm,
                                    out_off, bias, stride, pad), out)
    return _shared_cpu(x, in_perm, in_off, reduce, assign, vertical, horizontal, expand, out_perm, out_off, bias,
                       stride, pad, OH, OW, out)


def _check_out(out, x, OH, OW, expand, factors):
    check_out(out, (x.shape[0], expand.shape[0], OH, OW), x.dtype, like=x,
              inputs=(("x", x),) + tuple((f"factor {i}", f) for i, f in enumerate(factors)))


def run_validated(form, x, args, bias, stride, pad, OH, OW, out=None, prep=None):
    """Execute factors that were validated before (the layers validate theirs once, at construction).

    ``form``: "cp", "svd" or "shared"; ``args``: the factor arrays in the order of the public function, with
    the offsets as host int64 arrays and every float array in x's dtype and on x's device; ``stride`` a pair,
    ``pad`` a 4-tuple, ``OH``/``OW`` the output size. No checks of the factors: use the public functions
    otherwise. ``out`` (checked here) is where to write the result, as in :func:`bicluster_cp_conv2d`. ``prep``: a
    dict in which the CPU path may keep what it derives from the factors alone, for the next call; the caller
    empties it whenever the factors change (a layer passes its per-dtype parameter cache).
    """
    cpu, gpu = _RUNNERS[form]
    if out is not None:
        _check_out(out, x, OH, OW, args[-3], args[2:-2] + (bias,))
    if is_cupy_array(x):
        return fill_out(gpu(x, *args, bias, stride, pad), out)
    return cpu(x, *args, bias, stride, pad, OH, OW, out, prep)


def bicluster_conv2d(x, *factors, bias=None, stride=1, padding=0, out=None):
    """Run a biclustered conv from its factors in result order: 8 arrays -> CP form
    (:func:`bicluster_cp_conv2d`), 7 arrays -> SVD form (:func:`bicluster_svd_conv2d`).

    ``bicluster_conv2d(x, *bicluster(W, G, H, ...), bias=b, stride=2)`` executes a decomposition result.
    """
    if len(factors) == 8:
        return bicluster_cp_conv2d(x, *factors, bias, stride=stride, padding=padding, out=out)
    if len(factors) == 7:
        return bicluster_svd_conv2d(x, *factors, bias, stride=stride, padding=padding, out=out)
    raise ValueError("bicluster_conv2d takes the factors in result order: 8 arrays (in_perm, in_offsets, reduce, "
                     "vertical, horizontal, expand, out_perm, out_offsets) for the CP form or 7 (in_perm, in_offsets, "
                     f"reduce, spatial, expand, out_perm, out_offsets) for the SVD form; got {len(factors)}")


# --------------------------------------------------------------------------------------------------------------
# CPU paths
# --------------------------------------------------------------------------------------------------------------


def _chunk(N, P, per_img_items, itemsize, cache_bytes=None):
    """Images per chunk: enough GEMM columns (``_TARGET_COLUMNS``), but the chunk's intermediates within
    ``cache_bytes`` (default ``_CACHE_BYTES``; one image at a time when an image's alone exceed it) and the workspace
    within ``_WORKSPACE_BYTES``."""
    per = max(1, per_img_items * itemsize)
    cache = _CACHE_BYTES if cache_bytes is None else cache_bytes
    return max(1, min(N, -(-_TARGET_COLUMNS // P), cache // per, _WORKSPACE_BYTES // per))


def _mk_tile(dt):
    """The GEMM micro-kernel's tile for ``dt`` (``kernels/cpu/gemm.py``), or None: BLAS then."""
    from ..kernels.cpu import gemm as KG
    return KG.tile_shape(dt) if USE_MICROKERNEL else None


def _expand_packs(prep, key, expand, out_off, out_perm, bias, dt):
    """(tile, per-output-group packed expansions, per-output-group biases in ``out_perm`` order) for the GEMM
    micro-kernel (``kernels/cpu/gemm.py``), the packs kept in the layer's cache under ``key``; (None, None, None)
    where the CPU has no micro-kernel (BLAS then)."""
    from ..kernels.cpu import gemm as KG
    tile = _mk_tile(dt)
    if tile is None:
        return None, None, None
    H = out_off.shape[0] - 1

    def make():
        G, Kc = expand.shape[1:]
        return [KG.pack_a(np.ascontiguousarray(expand[int(out_off[h]):int(out_off[h + 1])]).reshape(-1, G * Kc)
                          .astype(dt, copy=False), tile[1]) for h in range(H)]
    biases = None if bias is None else [bias[out_perm[int(out_off[h]):int(out_off[h + 1])]] for h in range(H)]
    return tile, prepared(prep, key, make), biases


def _flat_packs(mats, MR):
    """The matrices ``mats`` packed by ``gemm.pack_a`` for ``MR``-row blocks, concatenated, and where each starts
    (int64, one more: the end), for the fused kernels."""
    from ..kernels.cpu import gemm as KG
    packs = [KG.pack_a(np.ascontiguousarray(a), MR) for a in mats]
    return np.concatenate(packs), np.cumsum([0] + [a.shape[0] for a in packs]).astype(np.int64)


def _group_rows(expand, out_off, dt):
    """Each output group's expansion rows (``F_h`` x ``G*K``), in ``dt``."""
    return [np.ascontiguousarray(expand[int(out_off[h]):int(out_off[h + 1])]).reshape(int(out_off[h + 1] - out_off[h]),
                                                                                     -1).astype(dt, copy=False)
            for h in range(out_off.shape[0] - 1)]


def _expand_scatter(z_buf, Z, expand, out_perm, out_off, bias, n0, m, P, y_buf, y3, mk):
    """The expansion of each output group h, ``expand_h @ Z[h]``, into the output channels ``out_perm`` of group h,
    with the bias: with the micro-kernel (``mk`` from :func:`_expand_packs`) one product per group stores straight
    into ``y3``'s rows; else (``mk[0]`` None) one BLAS GEMM per group into the staging buffer ``y_buf``, then a
    scatter. ``Z`` is a view of ``z_buf``, which has :data:`_SLACK` readable values past it."""
    from ..kernels.cpu import bicluster as KB
    G = expand.shape[1]
    Kc = expand.shape[2]
    tile, packs, biases = mk
    if tile is not None:
        from ..kernels.cpu import gemm as KG
        F = y3.shape[1]
        yflat = y3.reshape(-1)[n0 * F * P:]
        for h in range(out_off.shape[0] - 1):
            o0, o1 = int(out_off[h]), int(out_off[h + 1])
            KG.matmul(packs[h], o1 - o0, G * Kc, tile, z_buf[h * G * Kc * m * P:], m * P, P, yflat, nimg=m,
                      cimg=F * P, bias=None if biases is None else biases[h], rowmap=out_perm[o0:o1])
        return
    ybuf = y_buf[:y3.shape[1] * m * P].reshape(y3.shape[1], m * P)
    for h in range(out_off.shape[0] - 1):
        o0, o1 = int(out_off[h]), int(out_off[h + 1])
        eh = expand[o0:o1].reshape(o1 - o0, G * Kc)
        np.matmul(eh, Z[h], out=ybuf[o0:o1])
    has_b = bias is not None
    b = bias if has_b else np.zeros(1, y3.dtype)
    KB.scatter_rows(ybuf, out_perm, b, has_b, n0, m, y3)


def _as_index(a):
    return np.ascontiguousarray(a, dtype=np.int64)


def _inverse(perm):
    """inv[perm[j]] = j for a validated permutation (int64)."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv


def _pack_chunk(x, n0, m, inv_perm, pad, stride, R, M, buf, image_major):
    """Images n0..n0+m of x packed by ``pack_phase`` into ``buf``: (m, C, sh, sw, R, M) when ``image_major`` (the
    CP and shared front ends), else channel-major (C, m, sh, sw, R, M) (the SVD form's per-group GEMMs)."""
    from ..kernels.cpu import bicluster as KB
    C = x.shape[1]
    sh, sw = stride
    shape = (m, C, sh, sw, R, M) if image_major else (C, m, sh, sw, R, M)
    xs = buf[:m * C * sh * sw * R * M].reshape(shape)
    KB.pack_phase(x, n0, inv_perm, pad[0], pad[2], sh, sw, image_major, xs)
    return xs


def _phase_geometry(OH, OW, X, Y, stride):
    """Rows R per row phase and columns M per column phase of the phase-split packed input."""
    sh, sw = stride
    R = -(-((OH - 1) * sh + X) // sh)
    M = -(-((OW - 1) * sw + Y) // sw)
    return R, M


_CpWeights = collections.namedtuple("_CpWeights", "in_perm inv_perm out_perm vertical expand cg_max rfirst hcoef "
                                                   "rcoef hor hpack hoff")


def _cp_gemm_front(dt, rfirst):
    """Whether the CP front end runs its folded reduction and horizontal pass as an implicit GEMM
    (``kernels/cpu/cp_front_gemm.py``): where the micro-kernel has its 12-row tile, for groups whose reduction is
    folded into the horizontal taps (``rfirst`` False)."""
    return USE_CP_GEMM_FRONT and not rfirst and _taps_ok(dt)


def _cp_weights(in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, sw, dt):
    """What the CPU CP path derives from the factors alone (index arrays as int64, the inverse input permutation,
    contiguous factors, the largest input group, the front end's choice and its tap coefficients; for the GEMM front
    end (:func:`_cp_gemm_front`) each group's folded coefficients packed for the micro-kernel, and their offsets)."""
    from ..kernels.cpu import bicluster as KB
    G, H, K, _ = vertical.shape
    C = reduce.shape[0]
    Y = horizontal.shape[3]
    in_perm = _as_index(in_perm)
    cg_max = int(np.diff(in_off).max())
    # groups of many channels: reduce to one plane per component first, then the horizontal taps
    rfirst = KB.cp_reduce_first(cg_max, sw, Y, USE_CP_GEMM_FRONT and _taps_ok(dt))
    if rfirst:
        rcoef = np.ascontiguousarray(reduce.reshape(C, H * K), dtype=dt)
        hor = np.ascontiguousarray(horizontal.reshape(G, H * K, Y), dtype=dt)
        hcoef = np.zeros((1, 1, 1), dt)
    else:
        # the reduction folded into the horizontal taps:
        # hcoef[j, h*K + k, b] = reduce[j, h, k] * horizontal[g(j), h, k, b]
        g_of = np.repeat(np.arange(G), np.diff(in_off))
        hcoef = np.ascontiguousarray(reduce.reshape(C, H * K, 1) * horizontal.reshape(G, H * K, Y)[g_of], dtype=dt)
        rcoef = np.zeros((1, 1), dt)
        hor = np.zeros((1, 1, 1), dt)
    hpack, hoff = np.zeros(1, dt), np.zeros(1, np.int64)
    if _cp_gemm_front(dt, rfirst):
        MR = _mk_tile(dt)[1]
        nblk = -(-H * K // MR)
        # A_g[hk, j*Y + b] = hcoef[j0 + j, hk, b], packed for the MR-row tile as gemm.pack_a packs ([blk, t, r] =
        # A_g[blk*MR + r, t], rows past H*K zero), group after group; NumPy here: pack_a is one parallel region a
        # call, and the functional API derives this on every call
        packs = []
        for g in range(G):
            a = np.zeros((nblk * MR, int(in_off[g + 1] - in_off[g]) * Y), dt)
            a[:H * K] = hcoef[int(in_off[g]):int(in_off[g + 1])].transpose(1, 0, 2).reshape(H * K, -1)
            packs.append(a.reshape(nblk, MR, -1).transpose(0, 2, 1).ravel())
        hoff = np.cumsum([0] + [a.shape[0] for a in packs[:-1]]).astype(np.int64)
        hpack = np.concatenate(packs)
    return _CpWeights(in_perm, _inverse(in_perm), _as_index(out_perm), np.ascontiguousarray(vertical),
                      np.ascontiguousarray(expand), cg_max, rfirst, hcoef, rcoef, hor, hpack, hoff)


def _cp_cpu(x, in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, out_off, bias, stride, pad, OH, OW,
            out=None, prep=None):
    from ..kernels.cpu import bicluster as KB
    x = np.ascontiguousarray(x)
    bias = None if bias is None else np.ascontiguousarray(bias)
    sh, sw = stride
    dt = x.dtype
    wts = prepared(prep, ("cpu-cp", dt, sw, USE_CP_GEMM_FRONT),
                   lambda: _cp_weights(in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, sw, dt))
    in_perm, inv_perm, out_perm, vertical, expand, cg_max, rfirst, hcoef, rcoef, hor, hpack, hoff = wts
    gemm_front = _cp_gemm_front(dt, rfirst)
    N = x.shape[0]
    G, H, K, X = vertical.shape
    Y = horizontal.shape[3]
    F = expand.shape[0]
    R, M = _phase_geometry(OH, OW, X, Y, stride)
    if gemm_front and USE_CP_FUSED:
        return _cp_fused_cpu(x, wts, in_off, out_off, bias, stride, pad, OH, OW, Y, _fused_row(M, dt.itemsize), out,
                             prep)
    # rows of the packed input and of the front end's planes padded to 64 bytes: the vertical taps, whole rows
    # apart, then load aligned
    per = 64 // dt.itemsize
    Mp = -(-M // per) * per
    P = OH * OW
    C = x.shape[1]
    plane = sh * sw * R * Mp
    per_z = H * G * K * P
    nb = _chunk(N, P, C * plane + per_z + F * P, dt.itemsize, _CP_CACHE_BYTES)
    # enough parallel jobs: split a group's quads of components (the GEMM front end's row blocks) when images x
    # groups alone are too few
    if gemm_front:
        from ..kernels.cpu import cp_front_gemm as KF
        VW, MR, NV = _mk_tile(dt)
        NR = VW * NV
        units = -(-H * K // MR)
    else:
        NR = 0
        units = -(-H * K // 4)
    nsplit = max(1, min(units, -(-4 * numba.get_num_threads() // (nb * G))))
    # the front end's jobs pack their own groups (no separate packing pass), when each group is packed by one job
    # only (nsplit 1) into an L1/L2-sized scratch
    own = _cp_own_pack(nsplit, cg_max * plane * dt.itemsize)
    if not own:
        # slack: the last plane's shifted taps read up to (Y - 1) // sw items past it, the GEMM front end's last
        # panel up to NR more
        xs_buf = WS.get_aligned("xs", nb * C * plane + NR + Mp, dt)
        xs_buf[nb * C * plane:] = 0
    else:
        xs_buf = np.zeros(0, dt)
    z_buf = WS.get("z", nb * per_z + _SLACK, dt)
    mk = _expand_packs(prep, ("cpu-cp-mk", dt), expand, out_off, out_perm, bias, dt)
    y_buf = WS.get("y", nb * F * P, dt) if mk[0] is None else None     # the BLAS path's staging buffer
    nth = numba.get_num_threads()
    if gemm_front:
        srow = KF.cp_gemm_scratch_size(sh, sw, R, Mp, MR, NR, cg_max if own else 0)
        koff = KF.cp_gemm_tap_offsets(cg_max, Y, sw, R, Mp, plane)
    else:
        srow = KB.cp_scratch_size(sh, sw, R, Mp, cg_max if own else 0, rfirst)
    scratch = WS.get_aligned("front", nth * srow, dt).reshape(nth, srow)
    y = np.empty((N, F, OH, OW), dt) if out is None else out
    y3 = y.reshape(N, F, P)
    for n0 in range(0, N, nb):
        m = min(nb, N - n0)
        if not own:
            _pack_chunk(x, n0, m, inv_perm, pad, stride, R, Mp, xs_buf, True)
        Z = z_buf[:m * per_z].reshape(H, G * K, m * P)
        if gemm_front:
            # the next job's input fetched ahead where the batch is several chunks (its input streams from memory):
            # ZF conv2, K = 6 at batch 128 1.03-1.06x (best of alternating rounds, two runs), K = 12 1.00-1.02x; for
            # one chunk (batch 1) 0.98x
            KF.cp_front_gemm(xs_buf, x, n0, in_perm, pad[0], pad[2], m, C, sh, sw, R, Mp, in_off, hpack, hoff, koff,
                             Y, MR, NR, vertical, OH, OW, nsplit, z_buf, m * P, scratch, N > nb)
        else:
            KB.cp_front(xs_buf, x, n0, in_perm, pad[0], pad[2], m, C, sh, sw, R, Mp, in_off, hcoef, vertical, OH,
                        OW, nsplit, Z, scratch, rfirst, rcoef, hor)
        _expand_scatter(z_buf, Z, expand, out_perm, out_off, bias, n0, m, P, y_buf, y3, mk)
    return y


def _fused_band_rows(N, OH, nth):
    """Output rows a band of the fused CP, SVD and shared-separable layers (``kernels/cpu/cp_fused.py``,
    ``kernels/cpu/svd_fused.py``, ``kernels/cpu/shared_gemm.py``). Bands give the threads more jobs
    (images x bands), at a price: each band repeats ``(X - 1) // SH`` rows of the horizontal pass and of the packing,
    about :data:`FUSED_BAND_COST` of the layer a band. The band count minimises the rounds of jobs the busiest
    thread runs times that price (the jobs are equal: numba shares them out in equal slices); then the rows are
    shared out evenly."""
    best, nbands = None, 1
    for nb in range(1, min(OH, 4 * nth) + 1):
        cost = -(-N * nb // nth) / nb * (1 + FUSED_BAND_COST * (nb - 1))
        if best is None or cost < best - 1e-12:
            best, nbands = cost, nb
    return -(-OH // nbands)


def _fused_row(M, itemsize):
    """Items of a packed row of the fused CP and shared-separable layers, for rows of ``M`` values of ``itemsize``
    bytes: ``M`` rounded up to 64 bytes (so that the vertical taps, whole rows apart, load aligned) unless that adds
    more than a quarter of ``M``; then ``M``, and less work in the front end's products over the rows. Same process,
    alternating, K = 8, twenty-eighth session (docs/benchmarks.md), unpadded against padded: ZF conv2 (28 -> 32)
    0.95-1.00x, a 13 x 13 3 x 3 layer (15 -> 16) 0.88-0.97x; 5 x 5 stride-1 layers on 20 x 20 (24 -> 32) and
    32 x 32 maps (36 -> 48) 1.03-1.15x, the bundled CIFAR network's conv2 (20 -> 32) 1.07-1.33x, at batches 1 and
    32 (and 128 for the CIFAR conv2)."""
    per = 64 // itemsize
    Mp = -(-M // per) * per
    return Mp if 4 * (Mp - M) <= M else M


def _cp_fused_cpu(x, wts, in_off, out_off, bias, stride, pad, OH, OW, Y, Mp, out, prep):
    """The CP layer as one parallel pass over (image, band of output rows) (``kernels/cpu/cp_fused.py``)."""
    from ..kernels.cpu import cp_front_gemm as KF
    from ..kernels.cpu import cp_fused as KU
    in_perm, out_perm, vertical, expand, cg_max, hpack, hoff = (wts.in_perm, wts.out_perm, wts.vertical, wts.expand,
                                                                wts.cg_max, wts.hpack, wts.hoff)
    dt = x.dtype
    sh, sw = stride
    N = x.shape[0]
    G, H, K, X = vertical.shape
    F = expand.shape[0]
    VW, MR, NV = _mk_tile(dt)
    NR = VW * NV
    nth = numba.get_num_threads()
    epack, eoff = prepared(prep, ("cpu-cp-fused", dt), lambda: _flat_packs(_group_rows(expand, out_off, dt), MR))
    BR = _fused_band_rows(N, OH, nth)
    Rb, _, plane = KU.cp_fused_geometry(BR, X, sh, sw, Mp, NR)
    koff = KF.cp_gemm_tap_offsets(cg_max, Y, sw, Rb, Mp, plane)
    srow = KU.cp_fused_scratch_size(BR, X, sh, sw, Mp, OW, MR, NR, cg_max, H * G * K, int(np.diff(out_off).max()),
                                    dt.itemsize)
    scratch = WS.get_aligned("front", nth * srow, dt).reshape(nth, srow)
    y = np.empty((x.shape[0], F, OH, OW), dt) if out is None else out
    has_b = bias is not None
    PL.run(KU.cp_fused, x, in_perm, pad[0], pad[2], sh, sw, Mp, in_off, hpack, hoff, koff, Y, MR, NR, vertical, OH,
           OW, BR, epack, eoff, out_off, out_perm, bias if has_b else np.zeros(1, dt), has_b, y, scratch, N > nth)
    PL.complete(y)
    return y


def _cp_own_pack(nsplit, group_bytes):
    """Whether the CP front end's jobs pack their own input group instead of a packing pass over the chunk: each
    group packed by one job (``nsplit`` 1), into at most ``_OWN_PACK_BYTES``. At batch 1 this saved the packing
    pass (ZF conv2: 1.02-1.06x for the layer, tenth session). Over many chunks the packing pass in memory order was
    faster in the eleventh and fifteenth sessions (1.02-1.05x at batch 128); after the GEMM's B-panel prefetch the
    jobs' own packing was faster there too (ZF conv2 at batch 128, same process, three runs, old / new medians:
    K = 6 1.08, 1.11, 0.96; K = 8 1.08, 1.10, 1.13; K = 12 1.12, 1.03, 1.03; eighteenth session)."""
    return nsplit == 1 and group_bytes <= _OWN_PACK_BYTES


def _round_rows(n, micro=False):
    """GEMM row counts are padded up to a multiple of 8 with zero rows: OpenBLAS's SGEMM runs a 51-row left
    operand (the paper's K2 = 51) 16-20% slower in absolute time than a 56-row one, and 38 rows 15% slower than
    40 (2 cores, ZF conv2 block shapes, 2026-11-26); the padding rows cost less than the odd-width edge kernels.
    On the micro-kernel (``micro``) no padding: a partial row block runs a tile of 4 or 8 rows, and padded rows
    would only lengthen the expansion's reduction (K2 = 51: 102 instead of 112)."""
    return n if micro else -(-n // 8) * 8


#: the SVD form's reduction and block convolutions as implicit GEMMs (``kernels/cpu/gemm_taps.py``) where the
#: micro-kernel has its 12-row tile (AVX-512): the reduction reads the input in place and stores the reduced
#: channels split by the stride phases, the block convolutions read those planes in place; else a packed copy of
#: the input, a GEMM, patch matrices and a GEMM. A module constant for same-process comparisons, not a user setting
USE_TAPS = True
#: the CP front end's folded reduction and horizontal pass as an implicit GEMM on the micro-kernel's 12-row tile
#: (``kernels/cpu/cp_front_gemm.py``; :func:`_cp_gemm_front`), else 4 components at a time in numba loops. A module
#: constant for same-process comparisons, not a user setting
USE_CP_GEMM_FRONT = True
#: where the GEMM front end runs (:func:`_cp_gemm_front`), the whole CP layer as one parallel pass over (image, band
#: of output rows), the front end's output kept in the thread's cache (``kernels/cpu/cp_fused.py``). A module
#: constant for same-process comparisons, not a user setting
USE_CP_FUSED = True
#: the fused layers' price of a band of output rows, as a fraction of the layer's time
#: (:func:`_fused_band_rows`):
#: ZF conv2, K = 6, batch 16, one thread: 4 bands an image took 1.13x the time of one band
FUSED_BAND_COST = 0.045
#: where the SVD form runs its implicit GEMMs (``USE_TAPS``), a batch as one parallel pass over images and bands
#: (``kernels/cpu/svd_fused.py``; bands from :func:`_fused_band_rows`). A module constant for same-process
#: comparisons, not a user setting
USE_SVD_FUSED = True
#: the shared-separable form's fused pass (``kernels/cpu/shared_gemm.py``, in bands as the CP form's:
#: :func:`_fused_band_rows`). A module constant for same-process comparisons, not a user setting
USE_SHARED_FUSED = True
#: the shared form's front-end jobs pack their own input groups (when a group's planes fit ``_OWN_PACK_BYTES``)
#: instead of a packing pass over the chunk: ZF conv2 (G=48, H=2, K=6, S=4), same process, 1.09x and 1.10x at batch
#: 128, 1.03x at batch 1 (eighteenth session). A module constant for same-process comparisons, not a user setting
SHARED_OWN_PACK = True


def _taps_ok(dt):
    """Whether the SVD form's implicit GEMM can run for ``dt``: the micro-kernel's tile has 12 rows."""
    tile = _mk_tile(dt)
    return tile is not None and tile[1] == 12


def _taps_groups(m, npan, nblk):
    """Row-block groups of the implicit GEMM over ``m`` images of ``npan`` panels and ``nblk`` row blocks: jobs
    enough for every thread four times over, as ``gemm.matmul`` splits."""
    return max(1, min(nblk, -(-4 * numba.get_num_threads() // (m * npan))))


@functools.lru_cache(maxsize=256)
def _svd_tap_offsets(c0, K1, X, Y, sh, sw, R, M, cstride):
    """Offsets of block taps (c, x, y) (that order: the spatial matrices' columns) in the SVD form's channel-major
    phase-split z1: channel ``c0 + c`` at ``cstride`` apart, phase (x % sh, y % sw), shift (x // sh, y // sw)."""
    c, x, y = np.meshgrid(np.arange(K1), np.arange(X), np.arange(Y), indexing="ij")
    off = (c0 + c) * cstride + ((x % sh) * sw + y % sw) * (R * M) + (x // sh) * M + y // sw
    off = np.ascontiguousarray(off.ravel().astype(np.int64))
    off.flags.writeable = False          # shared by the cache
    return off


_SvdWeights = collections.namedtuple("_SvdWeights", "inv_perm out_perm red_t sp_mats expand_p")


def _svd_weights(in_perm, in_off, reduce, spatial, expand, out_perm, dt, micro):
    """The CPU SVD path's GEMM operands, zero-padded for BLAS (:func:`_round_rows`; ``micro``: for the micro-kernel,
    not padded): per-group reduction matrices (R1 >= H*K1, C_g), per-block spatial matrices (K2p >= K2, K1*X*Y) and
    the expansion (F, G, K2p) with zero columns under the padding rows; the inverse input permutation and the output
    permutation as int64."""
    G, H, K2, K1, X, Y = spatial.shape
    F = expand.shape[0]
    R1 = _round_rows(H * K1, micro)
    K2p = _round_rows(K2, micro)
    red_t = []
    for g in range(G):
        i0, i1 = int(in_off[g]), int(in_off[g + 1])
        rg = np.zeros((R1, i1 - i0), dt)
        rg[:H * K1] = reduce[i0:i1].reshape(i1 - i0, H * K1).T
        red_t.append(rg)
    if K2p == K2:
        sp_mats = np.ascontiguousarray(spatial).reshape(G, H, K2, K1 * X * Y)
        expand_p = np.ascontiguousarray(expand)
    else:
        sp_mats = np.zeros((G, H, K2p, K1 * X * Y), dt)
        sp_mats[:, :, :K2] = spatial.reshape(G, H, K2, K1 * X * Y)
        expand_p = np.zeros((F, G, K2p), dt)
        expand_p[:, :, :K2] = expand
    return _SvdWeights(_inverse(_as_index(in_perm)), _as_index(out_perm), red_t, sp_mats, expand_p)


def _svd_cpu(x, in_perm, in_off, reduce, spatial, expand, out_perm, out_off, bias, stride, pad, OH, OW, out=None,
             prep=None):
    from ..kernels.cpu import bicluster as KB
    from ..kernels.cpu import gemm_taps as KT
    x = np.ascontiguousarray(x)
    bias = None if bias is None else np.ascontiguousarray(bias)
    N, C = x.shape[:2]
    G, H, K2, K1, X, Y = spatial.shape
    F = expand.shape[0]
    sh, sw = stride
    R, M = _phase_geometry(OH, OW, X, Y, stride)
    P = OH * OW
    dt = x.dtype
    plane = sh * sw * R * M
    micro = _mk_tile(dt) is not None
    R1 = _round_rows(H * K1, micro)
    K2p = _round_rows(K2, micro)
    wts = prepared(prep, ("cpu-svd", dt, micro), lambda: _svd_weights(in_perm, in_off, reduce, spatial, expand,
                                                                       out_perm, dt, micro))
    inv_perm, out_perm, red_t, sp_mats, expand_p = wts
    per_xs = C * plane
    per_z1 = G * R1 * plane
    per_col = K1 * X * Y * P
    per_z2 = H * G * K2p * P
    # block (g, h)'s K1 reduced channels start at row g * R1 + h * K1 of z1
    c0s = (np.arange(G)[:, None] * R1 + np.arange(H)[None, :] * K1).reshape(G * H).astype(np.int64)
    # (the chunk bound counts the packed input and the patch matrices, which the implicit GEMMs do without)
    nb = _chunk(N, P, per_xs + per_z1 + per_col + per_z2 + F * P, dt.itemsize)
    # the implicit GEMMs (``USE_TAPS``, on the 12-row AVX-512 tile): the reduction reads the input in place and
    # stores phase-split (no packed copy of the input), and the block convolutions read its planes in place, past
    # the last plane of z1 by a panel and the taps' column reach
    taps = USE_TAPS and _taps_ok(dt)
    if taps and USE_SVD_FUSED:
        return _svd_fused_cpu(x, wts, in_perm, in_off, out_off, bias, stride, pad, OH, OW, M, R1, K2p, c0s, K1, X, Y,
                              out, prep)
    xs_buf = None if taps else WS.get("xs", nb * per_xs + _SLACK, dt)
    z1_buf = WS.get("z1", nb * per_z1 + (_SLACK + Y if taps else 0), dt)
    if taps:
        H_in, W_in = x.shape[2], x.shape[3]
        # the planes' padding (and rounding) is never stored by the reduction: zeros, for every chunk's layout
        KT.zero_phase_borders(z1_buf, nb * G * R1, sh, sw, R, M, H_in, W_in, pad[0], pad[2])
        red_koff = [_as_index(in_perm[int(in_off[g]):int(in_off[g + 1])]) * (H_in * W_in) for g in range(G)]
        xflat = x.reshape(-1)
        VW, _, NV = _mk_tile(dt)
        NR = VW * NV                                    # the tile's columns
    # A batch that is one chunk (small batches) builds every block's patches in one parallel region, when they fit
    # the workspace bound: one region per block, each followed by its GEMM, paid a hand-over between numba's and
    # OpenBLAS's threads per block (ZF conv2 SVD at batch 1: 707 -> 620 us for the four blocks' patches and GEMMs;
    # conv5-sized blocks 370 -> 300 us). Over many chunks, one block at a time measured faster (ZF conv2 at batch
    # 128: 115-120 against 125-135 ms): a block's patches are still in the cache when its GEMM reads them.
    nblk_col = 0 if taps else G * H if nb >= N and G * H * nb * per_col * dt.itemsize <= _WORKSPACE_BYTES else 1
    col_buf = None if taps else WS.get("col", max(1, nblk_col) * nb * per_col + _SLACK, dt)
    z2_buf = WS.get("z2", nb * per_z2 + _SLACK, dt)
    mk = _expand_packs(prep, ("cpu-svd-mk", dt), expand_p, out_off, out_perm, bias, dt)
    y_buf = WS.get("y", nb * F * P, dt) if mk[0] is None else None     # the BLAS path's staging buffer
    tile = mk[0]
    if tile is not None:
        from ..kernels.cpu import gemm as KG
        red_pk, sp_pk = prepared(prep, ("cpu-svd-mk-in", dt), lambda: (
            [KG.pack_a(r, tile[1]) for r in red_t],
            [KG.pack_a(sp_mats[g, h], tile[1]) for g in range(G) for h in range(H)]))
    y = np.empty((N, F, OH, OW), dt) if out is None else out
    y3 = y.reshape(N, F, P)
    KXY = K1 * X * Y
    for n0 in range(0, N, nb):
        m = min(nb, N - n0)
        z1 = z1_buf[:m * per_z1].reshape(G * R1, m, sh, sw, R, M)
        z1f = z1.reshape(G * R1, m * plane)
        if taps:
            # each group's reduction over its input channels in place, stored split by the stride phases: no packed
            # copy of the input (against the packing pass and a GEMM on the packed input, same process: ZF conv2
            # 1.07-1.12x at batch 128, AlexNet-sized conv3-5 1.10-1.17x, CIFAR conv2 1.00x; at batch 1 within noise)
            groups = _taps_groups(m, -(-H_in * W_in // NR), -(-R1 // tile[1]))
            for g in range(G):
                KT.gemm_taps_phase(red_pk[g], R1, int(in_off[g + 1] - in_off[g]), tile[1], NR,
                                   xflat[n0 * C * H_in * W_in:], C * H_in * W_in, red_koff[g], H_in, W_in, m,
                                   z1_buf[g * R1 * m * plane:], m * plane, plane, sh, sw, R, M, pad[0], pad[2],
                                   groups, KG.PREFETCH_PANELS)
        else:
            # channel-major (C, m, ...) layouts: a group's reduction is one GEMM over the whole chunk
            xs2 = _pack_chunk(x, n0, m, inv_perm, pad, stride, R, M, xs_buf, False).reshape(C, m * plane)
            for g in range(G):
                i0, i1 = int(in_off[g]), int(in_off[g + 1])
                if tile is not None:
                    KG.matmul(red_pk[g], R1, i1 - i0, tile, xs_buf[i0 * m * plane:], m * plane, m * plane,
                              z1_buf[g * R1 * m * plane:])
                else:
                    np.matmul(red_t[g], xs2[i0:i1], out=z1f[g * R1:(g + 1) * R1])
        Z = z2_buf[:m * per_z2].reshape(H, G * K2p, m * P)

        def spatial(b, cb):
            """Block b's K2p output rows of Z from its patches, column block ``cb`` of col_buf."""
            g, h = b // H, b % H
            if tile is not None:
                KG.matmul(sp_pk[b], K2p, KXY, tile, col_buf[cb * KXY * m * P:], m * P, m * P,
                          z2_buf[(h * G + g) * K2p * m * P:])
            else:
                col = col_buf[cb * KXY * m * P:(cb + 1) * KXY * m * P].reshape(KXY, m * P)
                np.matmul(sp_mats[g, h], col, out=Z[h, g * K2p:(g + 1) * K2p])

        if taps:
            # no patch matrices: each block's product reads its K1 reduced channels' phase-split planes in place
            # (ZF conv2, G = H = 2, K1 = 19, K2 = 51, 2-core Zen 4 VM, same process against the patch matrices:
            # 1.08-1.11x at batch 128, 1.17-1.18x at batch 1; the product computes OH x M positions for OH x OW)
            groups = _taps_groups(m, -(-OH * M // NR), -(-K2p // tile[1]))
            for b in range(G * H):
                g, h = b // H, b % H
                koff = _svd_tap_offsets(int(c0s[b]), K1, X, Y, sh, sw, R, M, m * plane)
                KT.gemm_taps_images(sp_pk[b], K2p, KXY, tile[1], NR, z1_buf, plane, koff, M, OH, OW, m,
                                    z2_buf[(h * G + g) * K2p * m * P:], m * P, P, groups)
        elif nblk_col > 1:
            # every block's patches in one parallel region, then the blocks' GEMMs back to back
            col = col_buf[:nblk_col * m * per_col].reshape(nblk_col, KXY, m * P)
            KB.im2col_phase(z1, c0s, K1, X, Y, OH, OW, col)
            for b in range(G * H):
                spatial(b, b)
        else:
            # one block at a time: its patches are still in the cache when its GEMM reads them
            col = col_buf[:m * per_col].reshape(1, KXY, m * P)
            for b in range(G * H):
                KB.im2col_phase(z1, c0s[b:b + 1], K1, X, Y, OH, OW, col)
                spatial(b, 0)
        _expand_scatter(z2_buf, Z, expand_p, out_perm, out_off, bias, n0, m, P, y_buf, y3, mk)
    return y


def _svd_fused_cpu(x, wts, in_perm, in_off, out_off, bias, stride, pad, OH, OW, M, R1, K2p, c0s, K1, X, Y, out, prep):
    """The SVD layer as one parallel pass over (image, band of output rows) (``kernels/cpu/svd_fused.py``)."""
    from ..kernels.cpu import gemm as KG
    from ..kernels.cpu import svd_fused as KS
    out_perm, red_t, sp_mats, expand_p = wts.out_perm, wts.red_t, wts.sp_mats, wts.expand_p
    dt = x.dtype
    N, _, H_in, W_in = x.shape
    sh, sw = stride
    G = in_off.shape[0] - 1
    H = out_off.shape[0] - 1
    F = expand_p.shape[0]
    VW, MR, NV = _mk_tile(dt)
    NR = VW * NV
    red, red_po, sp, sp_po, ep, eoff = prepared(prep, ("cpu-svd-fused", dt), lambda: (
        _flat_packs(red_t, MR) + _flat_packs([sp_mats[g, h] for g in range(G) for h in range(H)], MR)
        + _flat_packs(_group_rows(expand_p, out_off, dt), MR)))
    red_koff = _as_index(in_perm) * (H_in * W_in)
    nth = numba.get_num_threads()
    BR = _fused_band_rows(N, OH, nth)
    Rb = BR + (X - 1) // sh
    plane = sh * sw * Rb * M
    sp_koff = np.stack([_svd_tap_offsets(int(c0s[b]), K1, X, Y, sh, sw, Rb, M, plane) for b in range(G * H)])
    sp_koff.flags.writeable = False     # read-only as the unfused path's offsets: the panels compile once for both
    n1, n2, nt = KS.svd_fused_sizes(G, H, R1, K2p, plane, BR * OW, int(np.diff(out_off).max()), MR, NR, Y)
    z1s = WS.get_aligned("svd-z1", nth * n1, dt).reshape(nth, n1)
    z2s = WS.get_aligned("svd-z2", nth * n2, dt).reshape(nth, n2)
    tiles = WS.get_aligned("svd-tile", nth * nt, dt).reshape(nth, nt)
    y = np.empty((N, F, OH, OW), dt) if out is None else out
    has_b = bias is not None
    PL.run(KS.svd_fused, x, in_off, red, red_po, red_koff, R1, sp, sp_po, sp_koff, K2p, K1 * X * Y, X, OH, OW, BR, sh,
           sw, M, pad[0], pad[2], ep, eoff, out_off, out_perm, bias if has_b else np.zeros(1, dt), has_b, y, z1s, z2s,
           tiles, MR, NR, KG.PREFETCH_PANELS)
    PL.complete(y)
    return y


def shared_plan(assign, n_filters=None):
    """Per-group list of the shared filters used: (used_ptr (G+1,), used_filter, slot (G, H, K)) int64 arrays;
    group g uses ``used_filter[used_ptr[g]:used_ptr[g+1]]`` (ascending) and ``slot[g, h, k]`` is the position
    of ``assign[g, h, k]`` in that list."""
    assign = np.asarray(to_numpy(assign), dtype=np.int64)
    G = assign.shape[0]
    S = int(assign.max()) + 1 if n_filters is None else int(n_filters)
    flat = assign.reshape(G, -1)
    used = np.zeros((G, S), bool)
    used[np.repeat(np.arange(G), flat.shape[1]), flat.ravel()] = True
    rank = np.cumsum(used, axis=1) - 1
    slot = np.take_along_axis(rank, flat, axis=1).reshape(assign.shape).astype(np.int64)
    used_ptr = np.zeros(G + 1, np.int64)
    np.cumsum(used.sum(1), out=used_ptr[1:])
    used_filter = np.nonzero(used)[1].astype(np.int64)
    return used_ptr, used_filter, slot


_SharedWeights = collections.namedtuple("_SharedWeights", "inv_perm out_perm reduce vertical horizontal expand "
                                                           "used_ptr used_filter slot cg_max nu_max")


def _shared_weights(in_perm, in_off, reduce, assign, vertical, horizontal, expand, out_perm):
    """What the CPU shared-separable path derives from the factors alone: the inverse input permutation and the
    output permutation as int64, contiguous factors, the filter lists (:func:`shared_plan`), the largest input group
    and the most filters a group uses."""
    used_ptr, used_filter, slot = shared_plan(assign, vertical.shape[0])
    return _SharedWeights(_inverse(_as_index(in_perm)), _as_index(out_perm), np.ascontiguousarray(reduce),
                          np.ascontiguousarray(vertical), np.ascontiguousarray(horizontal),
                          np.ascontiguousarray(expand), used_ptr, used_filter, slot, int(np.diff(in_off).max()),
                          int(np.diff(used_ptr).max()))


def _shared_cpu(x, in_perm, in_off, reduce, assign, vertical, horizontal, expand, out_perm, out_off, bias, stride,
                pad, OH, OW, out=None, prep=None):
    from ..kernels.cpu import bicluster as KB
    x = np.ascontiguousarray(x)
    bias = None if bias is None else np.ascontiguousarray(bias)
    wts = prepared(prep, ("cpu-shared", x.dtype), lambda: _shared_weights(in_perm, in_off, reduce, assign, vertical,
                                                                           horizontal, expand, out_perm))
    inv_perm, out_perm, reduce, vertical, horizontal, expand, used_ptr, used_filter, slot, cg_max, nu_max = wts
    N = x.shape[0]
    G, H, K = slot.shape
    X = vertical.shape[1]
    Y = horizontal.shape[1]
    F = expand.shape[0]
    sh, sw = stride
    R, M = _phase_geometry(OH, OW, X, Y, stride)
    P = OH * OW
    C = x.shape[1]
    plane = sh * sw * R * M
    per_z = H * G * K * P
    dt = x.dtype
    if USE_SHARED_FUSED and _taps_ok(dt):
        return _shared_gemm_cpu(x, wts, _as_index(in_perm), in_off, out_off, bias, pad, OH, OW, M, stride, out, prep)
    nb = _chunk(N, P, C * plane + per_z + F * P, x.dtype.itemsize, _CP_CACHE_BYTES)
    # the front end's jobs pack their own groups (no packing pass) when a group's planes fit _OWN_PACK_BYTES
    own = SHARED_OWN_PACK and cg_max * plane * dt.itemsize <= _OWN_PACK_BYTES
    xs_buf = np.zeros(0, dt) if own else WS.get("xs", nb * C * plane, dt)
    z_buf = WS.get("z", nb * per_z + _SLACK, dt)
    mk = _expand_packs(prep, ("cpu-shared-mk", dt), expand, out_off, out_perm, bias, dt)
    y_buf = WS.get("y", nb * F * P, dt) if mk[0] is None else None     # the BLAS path's staging buffer
    y = np.empty((N, F, OH, OW), dt) if out is None else out
    y3 = y.reshape(N, F, P)
    nth = numba.get_num_threads()
    srow = KB.shared_scratch_size(cg_max, nu_max, sw, M, OH, OW, Y, plane if own else 0)
    scratch = WS.get("front", nth * srow, dt).reshape(nth, srow)
    in_idx = _as_index(in_perm)
    for n0 in range(0, N, nb):
        m = min(nb, N - n0)
        if not own:
            _pack_chunk(x, n0, m, inv_perm, pad, stride, R, M, xs_buf, True)
        Z = z_buf[:m * per_z].reshape(H, G * K, m * P)
        KB.shared_front(xs_buf, m, C, sh, sw, R, M, in_off, used_ptr, used_filter, vertical, horizontal, reduce, slot,
                        OH, OW, Z, scratch, x, n0, in_idx, pad[0], pad[2], own)
        _expand_scatter(z_buf, Z, expand, out_perm, out_off, bias, n0, m, P, y_buf, y3, mk)
    return y


def _shared_gemm_packs(wts, Y, MR, dt):
    """Each input group's horizontal coefficients for :func:`kernels.cpu.shared_gemm.shared_gemm_fused`: ``A_g``
    (``U_g`` x ``Y``, the horizontal taps of the shared filters the group uses, in its list's order) packed for the
    ``MR``-row tile as ``gemm.pack_a`` packs, group after group, and the groups' offsets."""
    used_ptr, used_filter, horizontal = wts.used_ptr, wts.used_filter, wts.horizontal
    packs = []
    for g in range(len(used_ptr) - 1):
        f = used_filter[used_ptr[g]:used_ptr[g + 1]]
        a = np.zeros((-(-len(f) // MR) * MR, Y), dt)
        a[:len(f)] = horizontal[f]
        packs.append(a.reshape(-1, MR, Y).transpose(0, 2, 1).ravel())
    return np.concatenate(packs), np.cumsum([0] + [p.shape[0] for p in packs[:-1]]).astype(np.int64)


def _shared_gemm_cpu(x, wts, in_perm, in_off, out_off, bias, pad, OH, OW, M, stride, out, prep):
    """The shared-separable layer as one parallel pass over (image, band of output rows) on the fused CP layer's
    machinery (``kernels/cpu/shared_gemm.py``)."""
    from ..kernels.cpu import cp_front_gemm as KF
    from ..kernels.cpu import cp_fused as KU
    from ..kernels.cpu import shared_gemm as KS
    _, out_perm, reduce, vertical, horizontal, expand, used_ptr, used_filter, slot, cg_max, nu_max = wts
    dt = x.dtype
    G, H, K = slot.shape
    X = vertical.shape[1]
    Y = horizontal.shape[1]
    F = expand.shape[0]
    sh, sw = stride
    VW, MR, NV = _mk_tile(dt)
    NR = VW * NV
    Mp = _fused_row(M, dt.itemsize)
    qpack, qoff = prepared(prep, ("cpu-shared-gemm", dt), lambda: _shared_gemm_packs(wts, Y, MR, dt))
    epack, eoff = prepared(prep, ("cpu-shared-fused", dt), lambda: _flat_packs(_group_rows(expand, out_off, dt), MR))
    nth = numba.get_num_threads()
    N = x.shape[0]
    BR = _fused_band_rows(N, OH, nth)
    Rb, _, plane = KU.cp_fused_geometry(BR, X, sh, sw, Mp, NR)
    koff = KF.cp_gemm_tap_offsets(1, Y, sw, Rb, Mp, plane)
    q_max = int((np.diff(in_off) * np.diff(used_ptr)).max())
    srow = KS.shared_gemm_scratch_size(BR, X, sh, sw, Mp, OW, MR, NR, cg_max, q_max, H * G * K,
                                       int(np.diff(out_off).max()), dt.itemsize)
    scratch = WS.get_aligned("front", nth * srow, dt).reshape(nth, srow)
    y = np.empty((N, F, OH, OW), dt) if out is None else out
    has_b = bias is not None
    PL.run(KS.shared_gemm_fused, x, in_perm, pad[0], pad[2], sh, sw, Mp, in_off, qpack, qoff, koff, Y, MR, NR,
           used_ptr, used_filter, vertical, reduce, slot, OH, OW, BR, epack, eoff, out_off, out_perm,
           bias if has_b else np.zeros(1, dt), has_b, y, scratch, N > nth)
    PL.complete(y)
    return y


# --------------------------------------------------------------------------------------------------------------
# composed paths (CuPy; also run on NumPy arrays by the tests): conv2d calls + array ops only
# --------------------------------------------------------------------------------------------------------------
def _sizes(off):
    return np.diff(off)


def _reduce_weight(xp, reduce, i0, i1, HK):
    """(H*K, C_g, 1, 1) 1x1 weight of one input group from reduce rows [i0, i1) (C_g, H, K)."""
    return xp.ascontiguousarray(reduce[i0:i1].reshape(i1 - i0, HK).T).reshape(HK, i1 - i0, 1, 1)


def _grouped_1x1(xp, xg, reduce, in_off, HK):
    """Per input group g: C_g -> H*K 1x1 conv; output channels ordered (g, h, k)."""
    sizes = _sizes(in_off)
    G = sizes.shape[0]
    if np.all(sizes == sizes[0]):
        cg = int(sizes[0])
        w = xp.ascontiguousarray(reduce.reshape(G, cg, HK).transpose(0, 2, 1)).reshape(G * HK, cg, 1, 1)
        return conv2d(xg, w, groups=G)
    parts = [conv2d(xg[:, int(in_off[g]):int(in_off[g + 1])],
                    _reduce_weight(xp, reduce, int(in_off[g]), int(in_off[g + 1]), HK)) for g in range(G)]
    return xp.concatenate(parts, axis=1)


def _expand_composed(xp, u, G, H, Kc, expand, out_perm, out_off, bias):
    """u (N, G*H*Kc, OH, OW) in (g, h, k) order -> y (N, F, OH, OW) in the original channel order."""
    N, _, OH, OW = u.shape
    F = expand.shape[0]
    u = xp.ascontiguousarray(u.reshape(N, G, H, Kc, OH, OW).transpose(0, 2, 1, 3, 4, 5)).reshape(N, H * G * Kc,
                                                                                               OH, OW)
    sizes = _sizes(out_off)
    if np.all(sizes == sizes[0]):
        yp = conv2d(u, xp.ascontiguousarray(expand).reshape(F, G * Kc, 1, 1), groups=H)
    else:
        yp = xp.concatenate([conv2d(u[:, h * G * Kc:(h + 1) * G * Kc],
                                    xp.ascontiguousarray(expand[int(out_off[h]):int(out_off[h + 1])]).reshape(
                                        int(sizes[h]), G * Kc, 1, 1)) for h in range(H)], axis=1)
    y = xp.empty_like(yp)
    y[:, out_perm] = yp
    if bias is not None:
        y += bias.reshape(1, F, 1, 1)
    return y


def _cp_composed(x, in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, out_off, bias, stride, pad):
    xp = get_array_module(x)
    G, H, K, X = vertical.shape
    Y = horizontal.shape[3]
    n = G * H * K
    xg = xp.take(x, in_perm, axis=1)
    z = _grouped_1x1(xp, xg, reduce, in_off, H * K)
    v = conv2d(z, xp.ascontiguousarray(vertical).reshape(n, 1, X, 1), stride=(stride[0], 1),
               padding=(pad[0], pad[1], 0, 0), groups=n)
    u = conv2d(v, xp.ascontiguousarray(horizontal).reshape(n, 1, 1, Y), stride=(1, stride[1]),
               padding=(0, 0, pad[2], pad[3]), groups=n)
    return _expand_composed(xp, u, G, H, K, expand, out_perm, out_off, bias)


def _svd_composed(x, in_perm, in_off, reduce, spatial, expand, out_perm, out_off, bias, stride, pad):
    xp = get_array_module(x)
    G, H, K2, K1, X, Y = spatial.shape
    xg = xp.take(x, in_perm, axis=1)
    z = _grouped_1x1(xp, xg, reduce, in_off, H * K1)
    u = conv2d(z, xp.ascontiguousarray(spatial).reshape(G * H * K2, K1, X, Y), stride=stride, padding=pad,
               groups=G * H)
    return _expand_composed(xp, u, G, H, K2, expand, out_perm, out_off, bias)


def _shared_composed(x, in_perm, in_off, reduce, assign, vertical, horizontal, expand, out_perm, out_off, bias,
                     stride, pad):
    """Every input channel filtered by every shared filter (depthwise passes), then a grouped 1x1 conv whose
    (H*K) x (C_g*S) matrix holds each component's weights at its filter's columns (zeros elsewhere)."""
    xp = get_array_module(x)
    C, H, K = reduce.shape
    S, X = vertical.shape
    Y = horizontal.shape[1]
    G = assign.shape[0]
    xg = xp.take(x, in_perm, axis=1)
    wv = xp.ascontiguousarray(xp.broadcast_to(vertical.reshape(1, S, X), (C, S, X))).reshape(C * S, 1, X, 1)
    wh = xp.ascontiguousarray(xp.broadcast_to(horizontal.reshape(1, S, Y), (C, S, Y))).reshape(C * S, 1, 1, Y)
    q = conv2d(xg, wv, stride=(stride[0], 1), padding=(pad[0], pad[1], 0, 0), groups=C)
    q = conv2d(q, wh, stride=(1, stride[1]), padding=(0, 0, pad[2], pad[3]), groups=C * S)   # channels (c, s)
    onehot = (xp.arange(S).reshape(1, 1, 1, S) == assign.reshape(G, H, K, 1)).astype(x.dtype)  # (G, H, K, S)
    sizes = _sizes(in_off)
    parts = []
    for g in range(G):
        i0, i1 = int(in_off[g]), int(in_off[g + 1])
        # (H, K, C_g, S): weight of component (h, k) on map (c, s)
        wg = reduce[i0:i1].transpose(1, 2, 0).reshape(H, K, i1 - i0, 1) * onehot[g].reshape(H, K, 1, S)
        parts.append(wg.reshape(H * K, (i1 - i0) * S, 1, 1))
    if np.all(sizes == sizes[0]):
        w = xp.ascontiguousarray(xp.concatenate(parts, axis=0))
        z = conv2d(q, w, groups=G)
    else:
        z = xp.concatenate([conv2d(q[:, int(in_off[g]) * S:int(in_off[g + 1]) * S], xp.ascontiguousarray(parts[g]))
                            for g in range(G)], axis=1)
    return _expand_composed(xp, z, G, H, K, expand, out_perm, out_off, bias)


# --------------------------------------------------------------------------------------------------------------
# GPU paths (CuPy): the dedicated kernels of npconv.kernels.cuda.ops_bicluster (imported on first use; importing it
# does not import CuPy). The composed paths above stay as the reference the tests compare against.
# --------------------------------------------------------------------------------------------------------------
def _cuda():
    from ..kernels.cuda import ops_bicluster
    return ops_bicluster


def _cp_gpu(x, in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, out_off, bias, stride, pad):
    return _cuda().bicluster_cp_conv2d(x, in_perm, in_off, reduce, vertical, horizontal, expand, out_perm, out_off,
                                       bias, stride=stride, padding=pad)


def _svd_gpu(x, in_perm, in_off, reduce, spatial, expand, out_perm, out_off, bias, stride, pad):
    return _cuda().bicluster_svd_conv2d(x, in_perm, in_off, reduce, spatial, expand, out_perm, out_off, bias,
                                        stride=stride, padding=pad)


def _shared_gpu(x, in_perm, in_off, reduce, assign, vertical, horizontal, expand, out_perm, out_off, bias, stride,
                pad):
    return _cuda().shared_separable_conv2d(x, in_perm, in_off, reduce, assign, vertical, horizontal, expand,
                                           out_perm, out_off, bias, stride=stride, padding=pad)


_RUNNERS = {"cp": (_cp_cpu, _cp_gpu), "svd": (_svd_cpu, _svd_gpu), "shared": (_shared_cpu, _shared_gpu)}


PL.watch(__name__)
