"""Numba kernels of the biclustered (CP, SVD) and shared-separable conv layers.

Layouts (``nb`` images of a batch chunk, ``P = OH * OW`` output positions):

* The phase-split padded layout (``_pack.pack_plane``) stores a padded input plane split by the row and column
  phases of the stride, ``[p, q, r, m] = x_padded[r * sh + p, m * sw + q]``. Every later pass then reads
  contiguous runs: a horizontal tap ``b`` at stride ``sw`` is the contiguous slice ``[b // sw, b // sw + OW)``
  of phase ``b % sw``; the zero padding is materialised once.
* ``pack_phase`` packs a chunk's input (padded, phase-split, channels in group order) for every form, reading
  the input in its memory order (the CP front end's jobs pack their own group instead when the batch is one chunk
  and each group has one job).
* The CP front end ``cp_front`` runs, for one (image, group g) per parallel job and 4 components at a time, the
  C_g -> 1 reduction folded into the horizontal Y-tap pass (column stride; each shifted input stream is loaded
  once for the 4 components), then per component the vertical X-tap pass (row stride; whole rows apart, so
  aligned loads) in a small per-thread scratch buffer, and writes the component's P outputs to
  ``Z[h, g * K + k, i * P:(i + 1) * P]``. For it the packed rows are padded to ``Mp`` items, a multiple of 64
  bytes. The inner loops run over contiguous runs, so the compiler vectorises them.
* ``Z[h]`` (G*K, nb*P) is then the right operand of ONE BLAS GEMM per output group (done by the caller),
  ``Ybuf[rows of h] = expand_h (F_h, G*K) @ Z[h]``, and ``scatter_rows`` moves ``Ybuf`` (rows in permuted
  output order, columns image-major) to ``y`` (N, F, P) adding the bias.
* The SVD form packs channel-major, ``(C, nb, sh, sw, R, M)``, so that a group's reduction is one GEMM for
  the whole chunk (the CP and shared forms image-major, ``(nb, C, ...)``), and builds each
  block's patch matrix with ``im2col_phase`` from the reduced channels, in the same channel-major layout.
* The shared-separable front end ``shared_front`` filters every input channel of a group once per shared
  filter the group uses, then forms each component as a C_g-term combination of those maps.
"""
from __future__ import annotations

import numba
import numpy as np

from ._pack import pack_plane as _pack_plane
from ._pack import pack_plane_ahead as _pack_plane_ahead
from .gemm import TAPS1_BYTES
from .gemm_taps import taps_rows


@numba.njit(cache=True, nogil=True)
def group_check(perm, offsets, n):
    """0 when perm is a permutation of range(n) and offsets rise strictly from 0 to n; 1: bad perm; 2: bad
    offsets. (One pass each, instead of several NumPy calls on every forward.)"""
    if perm.shape[0] != n:
        return 1
    seen = np.zeros(n, np.uint8)
    for i in range(n):
        v = perm[i]
        if v < 0 or v >= n or seen[v]:
            return 1
        seen[v] = 1
    k = offsets.shape[0]
    if k < 2 or offsets[0] != 0 or offsets[k - 1] != n:
        return 2
    for i in range(1, k):
        if offsets[i] <= offsets[i - 1]:
            return 2
    return 0


def shared_scratch_size(cg_max, nu_max, sw, M, OH, OW, Y, own_plane=0):
    """Items of one thread's scratch row for :func:`shared_front` (largest input group ``cg_max``, ``nu_max``
    shared filters used per group; ``own_plane``: the items of one packed input plane when the jobs pack their own
    groups, else 0): the vertical pass's ``sw`` planes with ``Y`` + a run (``gemm.TAPS1_BYTES``, in float32 values)
    of slack for the horizontal pass's reads, the filtered maps, the packed group."""
    return sw * OH * M + Y + TAPS1_BYTES // 4 + nu_max * cg_max * OH * OW + cg_max * own_plane


@numba.njit(parallel=True, cache=True, nogil=True)
def pack_phase(x, n0, inv_perm, pt, pl, sh, sw, image_major, xs):
    """Pack images n0.. of x padded and split by the stride phases, channels in group order: with
    ``image_major`` False, xs is (C, nb, sh, sw, R, M) and

        xs[inv_perm[c], i, p, q, r, m] = x[n0+i, c, r*sh + p - pt, m*sw + q - pl]   (0 outside the input),

    with ``image_major`` True xs is (nb, C, sh, sw, R, M), indexed ``xs[i, inv_perm[c]]``. ``inv_perm`` is the
    inverse of ``in_perm`` (position ``inv_perm[c]`` of the group order holds input channel c). Every tap of a
    strided pass is then a contiguous run. The SVD form packs channel-major, so that a group's reduction is one
    GEMM for the chunk; the CP and shared forms image-major, so that a group's channels of one image are
    adjacent. The jobs run in the input's memory order (image-major, channels ascending) and scatter the writes:
    taken in group order, the reads jumped between channel planes and defeated the hardware prefetch (ZF conv2
    at batch 128, 2 cores: 15 -> 8 ms).
    """
    C = x.shape[1]
    nb = xs.shape[0] if image_major else xs.shape[1]
    for job in numba.prange(nb * C):
        i = job // C
        c = job - i * C
        if image_major:
            _pack_plane(x[n0 + i, c], pt, pl, sh, sw, xs[i, inv_perm[c]])
        else:
            _pack_plane(x[n0 + i, c], pt, pl, sh, sw, xs[inv_perm[c], i])


@numba.njit(cache=True, nogil=True, inline="always")
def _taps(dst, src, offs, coef, n, accumulate):
    """dst[e] (+)= sum_t coef[t] * src[offs[t] + e] for e < n.

    Four taps per sweep (five, three or two when that is all there is) keep the partial sum in registers (one
    store per sweep instead of one per tap; the remainder after a 4-tap sweep goes one tap per sweep, which
    keeps the number of compiled loops, and so the compile time, down),
    and every array is read through a 1-D view indexed by the bare loop variable, so numba drops its
    negative-index test and the loops vectorise.
    """
    T = offs.shape[0]
    t = 0
    first = not accumulate
    while t < T:
        r = T - t
        if r == 5 and first:
            # the common 5-tap case (5x5 kernels) in one sweep
            c0 = coef[t]
            c1 = coef[t + 1]
            c2 = coef[t + 2]
            c3 = coef[t + 3]
            c4 = coef[t + 4]
            s0 = src[offs[t]:offs[t] + n]
            s1 = src[offs[t + 1]:offs[t + 1] + n]
            s2 = src[offs[t + 2]:offs[t + 2] + n]
            s3 = src[offs[t + 3]:offs[t + 3] + n]
            s4 = src[offs[t + 4]:offs[t + 4] + n]
            for e in range(n):
                dst[e] = c0 * s0[e] + c1 * s1[e] + c2 * s2[e] + c3 * s3[e] + c4 * s4[e]
            t += 5
        elif r >= 4:
            c0 = coef[t]
            c1 = coef[t + 1]
            c2 = coef[t + 2]
            c3 = coef[t + 3]
            s0 = src[offs[t]:offs[t] + n]
            s1 = src[offs[t + 1]:offs[t + 1] + n]
            s2 = src[offs[t + 2]:offs[t + 2] + n]
            s3 = src[offs[t + 3]:offs[t + 3] + n]
            if first:
                for e in range(n):
                    dst[e] = c0 * s0[e] + c1 * s1[e] + c2 * s2[e] + c3 * s3[e]
            else:
                for e in range(n):
                    dst[e] += c0 * s0[e] + c1 * s1[e] + c2 * s2[e] + c3 * s3[e]
            t += 4
        elif r == 3 and first:
            c0 = coef[t]
            c1 = coef[t + 1]
            c2 = coef[t + 2]
            s0 = src[offs[t]:offs[t] + n]
            s1 = src[offs[t + 1]:offs[t + 1] + n]
            s2 = src[offs[t + 2]:offs[t + 2] + n]
            for e in range(n):
                dst[e] = c0 * s0[e] + c1 * s1[e] + c2 * s2[e]
            t += 3
        elif r == 2 and first:
            c0 = coef[t]
            c1 = coef[t + 1]
            s0 = src[offs[t]:offs[t] + n]
            s1 = src[offs[t + 1]:offs[t + 1] + n]
            for e in range(n):
                dst[e] = c0 * s0[e] + c1 * s1[e]
            t += 2
        else:
            c0 = coef[t]
            s0 = src[offs[t]:offs[t] + n]
            if first:
                for e in range(n):
                    dst[e] = c0 * s0[e]
            else:
                for e in range(n):
                    dst[e] += c0 * s0[e]
            t += 1
        first = False


@numba.njit(cache=True, fastmath={"contract"}, nogil=True)
def _sweep4(acc, ao, src, offs, coef, t, nt, n, init):
    """``acc[k, ao:ao+n] (+)= sum_{tap = t .. t+nt-1} coef[k, tap] * src[offs[tap] + :n]`` for the 4 rows k of acc
    (assigning when ``init``); ``nt`` is 5, 3 or 1. Each source load feeds 4 accumulators, so the loads of the
    shifted (unaligned) tap streams are shared by 4 components; the multiply-adds are contracted into FMAs."""
    A0 = acc[0, ao:]
    A1 = acc[1, ao:]
    A2 = acc[2, ao:]
    A3 = acc[3, ao:]
    if nt == 5:
        s0 = src[offs[t]:]
        s1 = src[offs[t + 1]:]
        s2 = src[offs[t + 2]:]
        s3 = src[offs[t + 3]:]
        s4 = src[offs[t + 4]:]
        a0 = coef[0, t]; a1 = coef[0, t + 1]; a2 = coef[0, t + 2]  # noqa: E702
        a3 = coef[0, t + 3]; a4 = coef[0, t + 4]  # noqa: E702
        b0 = coef[1, t]; b1 = coef[1, t + 1]; b2 = coef[1, t + 2]  # noqa: E702
        b3 = coef[1, t + 3]; b4 = coef[1, t + 4]  # noqa: E702
        c0 = coef[2, t]; c1 = coef[2, t + 1]; c2 = coef[2, t + 2]  # noqa: E702
        c3 = coef[2, t + 3]; c4 = coef[2, t + 4]  # noqa: E702
        d0 = coef[3, t]; d1 = coef[3, t + 1]; d2 = coef[3, t + 2]  # noqa: E702
        d3 = coef[3, t + 3]; d4 = coef[3, t + 4]  # noqa: E702
        if init:
            for j in range(n):
                u0 = s0[j]; u1 = s1[j]; u2 = s2[j]; u3 = s3[j]; u4 = s4[j]  # noqa: E702
                A0[j] = a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3 + a4 * u4
                A1[j] = b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3 + b4 * u4
                A2[j] = c0 * u0 + c1 * u1 + c2 * u2 + c3 * u3 + c4 * u4
                A3[j] = d0 * u0 + d1 * u1 + d2 * u2 + d3 * u3 + d4 * u4
        else:
            for j in range(n):
                u0 = s0[j]; u1 = s1[j]; u2 = s2[j]; u3 = s3[j]; u4 = s4[j]  # noqa: E702
                A0[j] = A0[j] + a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3 + a4 * u4
                A1[j] = A1[j] + b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3 + b4 * u4
                A2[j] = A2[j] + c0 * u0 + c1 * u1 + c2 * u2 + c3 * u3 + c4 * u4
                A3[j] = A3[j] + d0 * u0 + d1 * u1 + d2 * u2 + d3 * u3 + d4 * u4
    elif nt == 3:
        s0 = src[offs[t]:]
        s1 = src[offs[t + 1]:]
        s2 = src[offs[t + 2]:]
        a0 = coef[0, t]; a1 = coef[0, t + 1]; a2 = coef[0, t + 2]  # noqa: E702
        b0 = coef[1, t]; b1 = coef[1, t + 1]; b2 = coef[1, t + 2]  # noqa: E702
        c0 = coef[2, t]; c1 = coef[2, t + 1]; c2 = coef[2, t + 2]  # noqa: E702
        d0 = coef[3, t]; d1 = coef[3, t + 1]; d2 = coef[3, t + 2]  # noqa: E702
        if init:
            for j in range(n):
                u0 = s0[j]; u1 = s1[j]; u2 = s2[j]  # noqa: E702
                A0[j] = a0 * u0 + a1 * u1 + a2 * u2
                A1[j] = b0 * u0 + b1 * u1 + b2 * u2
                A2[j] = c0 * u0 + c1 * u1 + c2 * u2
                A3[j] = d0 * u0 + d1 * u1 + d2 * u2
        else:
            for j in range(n):
                u0 = s0[j]; u1 = s1[j]; u2 = s2[j]  # noqa: E702
                A0[j] = A0[j] + a0 * u0 + a1 * u1 + a2 * u2
                A1[j] = A1[j] + b0 * u0 + b1 * u1 + b2 * u2
                A2[j] = A2[j] + c0 * u0 + c1 * u1 + c2 * u2
                A3[j] = A3[j] + d0 * u0 + d1 * u1 + d2 * u2
    else:
        s0 = src[offs[t]:]
        a0 = coef[0, t]
        b0 = coef[1, t]
        c0 = coef[2, t]
        d0 = coef[3, t]
        if init:
            for j in range(n):
                u0 = s0[j]
                A0[j] = a0 * u0
                A1[j] = b0 * u0
                A2[j] = c0 * u0
                A3[j] = d0 * u0
        else:
            for j in range(n):
                u0 = s0[j]
                A0[j] = A0[j] + a0 * u0
                A1[j] = A1[j] + b0 * u0
                A2[j] = A2[j] + c0 * u0
                A3[j] = A3[j] + d0 * u0


@numba.njit(cache=True, nogil=True)
def _taps4(acc, ao, src, offs, coef, T, n, init):
    """``acc[k, ao:ao+n] (+)= sum_{t < T} coef[k, t] * src[offs[t] + :n]`` for 4 rows: sweeps of 5, 3 or 1 taps."""
    t = np.int64(0)
    while t < T:
        r = T - t
        nt = 5 if r >= 5 else (3 if r >= 3 else 1)
        _sweep4(acc, ao, src, offs, coef, t, nt, n, init and t == 0)
        t += nt


def cp_scratch_size(sh, sw, R, Mp, cg_pack=0, reduce_first=False):
    """Items of one thread's scratch row for :func:`cp_front`: 4 accumulator planes of ``sh * R * Mp``, a run of
    slack (``gemm.TAPS1_BYTES`` in float32 values: the vertical pass reads up to a run past a plane's row), when the
    jobs pack their own input (``cg_pack``, the largest input group, > 0) that group's planes (``sh * sw * R * Mp``
    each) and ``Mp`` items of slack, and with ``reduce_first`` 4 reduced planes (``sh * sw * R * Mp`` each) and
    ``Mp`` items of slack; a multiple of 64 bytes, so rows that start aligned stay aligned."""
    plane = sh * sw * R * Mp
    own = cg_pack * plane + Mp if cg_pack else 0
    red = 4 * plane + Mp if reduce_first else 0
    return 4 * sh * R * Mp + TAPS1_BYTES // 4 + own + red


def cp_reduce_first(cg, sw, Y, gemm=False):
    """Whether :func:`cp_front` reduces a group's ``cg`` channels to one plane per component before the
    horizontal pass (``cg * sw + Y`` multiply-adds per horizontal output, the reduction on every column phase)
    rather than folding the reduction into the horizontal taps (``cg * Y``, but the input loads shared by 4
    components and no extra pass): when folding costs at least 1.5 times as many multiply-adds. Measured at
    Y = 5 (same process, interleaved, 2026-11-26): C_g = 2 folds (stride 1: 18.1 against 18.9 ms; ZF conv2,
    stride 2: 11.6 against 12.6), C_g = 3 and 4 reduce first (stride 1: 9.4 against 10.3, 10.0 against 11.6;
    C_g = 4, stride 2: 4.9 against 5.9), as do C_g = 8 and 12 (the bundled CIFAR network's conv2 at G = 8:
    6.2 against 8.6 ms at batch 128).

    With ``gemm`` (the folded front end runs as an implicit GEMM on the micro-kernel, fused with the expansion:
    ``kernels/cpu/cp_fused.py``), folding pays up to about 4 times the multiply-adds: fold unless ``cg * Y > 4 *
    (cg * sw + Y)``. Folded and fused against reduce-first, K = 8 unless said (twenty-eighth session, same process,
    docs/benchmarks.md): CIFAR conv2 (stride 1) C_g = 2 / 4 / 8 / 16 at batch 32 1.75 / 1.55 / 1.31 / 1.32x (K = 24:
    C_g = 8 1.15x, 16 0.97x), at batch 1 1.4-2.5x; ZF conv2 (stride 2) C_g = 4-96 at batch 16 1.28-2.15x, at batch 1
    1.3-2.1x. Past the bound, C_g = 32 and 64 at stride 1, batch 32: 1.03-1.20x at K = 8 but 0.88 and 0.76x at K = 24
    (at batch 1 folding stays faster, 1.4-2.4x)."""
    if gemm:
        return cg * Y > 4 * (cg * sw + Y)
    return 2 * cg * Y >= 3 * (cg * sw + Y)


@numba.njit(cache=True, nogil=True, inline="always")
def front_job(job, nsplit, G, in_offsets):
    """A CP front-end job's (slice, image x group index t, group g, image i, first channel j0 of the group in group
    order, channels cg): jobs run image by image, group by group, ``nsplit`` slices of a group's components each."""
    t = job // nsplit
    g = t % G
    j0 = in_offsets[g]
    return job % nsplit, t, g, t // G, j0, in_offsets[g + 1] - j0


@numba.njit(cache=True, nogil=True, inline="always")
def band_job(job, nbands, BR, OH):
    """A fused layer's job (``cp_fused``, ``svd_fused``, ``shared_gemm``) as (image, first output row, output
    rows) of its band: jobs run image by image, ``nbands`` bands of ``BR`` rows an image, the last band with what is
    left of the ``OH`` rows."""
    n = job // nbands
    o0 = (job - n * nbands) * BR
    return n, o0, min(BR, OH - o0)


#: inputs of at most this many bytes are packed without fetching ahead (:func:`next_plane`): they stay in a core's L2
#: between calls, and the fetches would be instructions spent on cached lines
AHEAD_MIN_BYTES = 1 << 20


@numba.njit(cache=True, nogil=True, inline="always")
def group_planes(own, sc, e0, slack, x, n, in_perm, j0, cg, pt, pl, SH, SW, R, Mp, xflat, first, xin, nxt):
    """(array, offset) of a front-end job's input group: with ``own``, channels ``in_perm[j0:j0 + cg]`` of image ``n``
    of ``x`` packed (:func:`_pack.pack_plane_ahead`, planes of ``SH*SW*R*Mp``) into ``sc[e0:]``, followed by ``slack``
    zeros, each channel's packing fetching the next one's plane, and the last channel's the plane at ``xin[nxt:]``
    (``xin`` the flat ``x``; ``nxt`` from :func:`next_plane`; with ``nxt`` < 0 nothing is fetched); else the chunk's
    packed input ``xflat`` from its plane ``first``."""
    plane = SH * SW * R * Mp
    if own:
        xg = sc[e0:e0 + cg * plane + slack]
        xg[cg * plane:] = 0
        HW = x.shape[2] * x.shape[3]
        for u in range(cg):
            noff = (np.int64(n) * x.shape[1] + in_perm[j0 + u + 1]) * HW if u + 1 < cg and nxt >= 0 else np.int64(nxt)
            _pack_plane_ahead(x[n, in_perm[j0 + u]], pt, pl, SH, SW,
                              xg[u * plane:(u + 1) * plane].reshape(SH, SW, R, Mp), xin, noff)
        return xg, 0
    return xflat, first * plane


@numba.njit(cache=True, nogil=True, inline="always")
def next_plane(x, n, g, in_perm, in_offsets):
    """Offset in the flat ``x`` of the first channel of group ``g`` (in group order) of image ``n``, ``g`` = G meaning
    group 0 of image ``n + 1``; -1 past the batch, and for an input of at most :data:`AHEAD_MIN_BYTES`: the plane a
    front-end job packs after its group's last channel (:func:`group_planes`)."""
    m = np.int64(n)         # a prange index may be unsigned: mixed with int64 it would give a float
    if x.size * x.itemsize <= AHEAD_MIN_BYTES:
        return np.int64(-1)
    if g == in_offsets.shape[0] - 1:
        g = 0
        m += 1
    if m >= x.shape[0]:
        return np.int64(-1)
    return (m * x.shape[1] + in_perm[in_offsets[g]]) * x.shape[2] * x.shape[3]


@numba.njit(parallel=True, cache=True, nogil=True)
def cp_front(xflat, x, n0, in_perm, pt, pl, nb, C, SH, SW, R, Mp, in_offsets, hcoef, vertical, OH, OW, nsplit, Z,
             scratch, reduce_first, rcoef, hor):
    """CP front end: Z[h, g*K + k, i*P:(i+1)*P] = vert_k * (horiz_k * (sum_j reduce[j, h, k] xs[i, j])).

    ``xflat``, when not empty, holds the chunk's input packed by :func:`pack_phase` image-major,
    (nb, C, SH, SW, R, Mp) (padded, phase-split, channels in group order), with rows of ``Mp`` items (a multiple
    of 64 bytes, on 64-byte boundaries) and at least ``Mp`` items of slack after it. When ``xflat`` is empty, each
    job packs its group's planes of image ``n0 + i`` of ``x`` (channels ``in_perm[in_offsets[g]:...]``, padding
    ``pt``/``pl``) into its scratch row itself, which saves the separate packing pass (when the CPU path chooses it:
    ``functional.bicluster._cp_own_pack``). ``hcoef`` (C, H*K, Y) is the reduction folded into
    the horizontal taps, ``hcoef[j, h*K + k, b] = reduce[j, h, k] * horizontal[g(j), h, k, b]``; vertical
    (G, H, K, X); Z (H, G*K, nb*P).

    One parallel job per (image i, input group g, slice of the group's components; ``nsplit`` slices, more than
    one only when images x groups alone are too few jobs). Components go 4 at a time:

    1. the reduction and the horizontal pass in one: for each row phase p and input channel j of the group,
       ``acc[k, p] (+)= sum_b hcoef[j, k, b] * xs[i, j, p, b % SW, :, b // SW + :]`` over the flat (R, Mp) plane
       (the Y shifted tap streams, unaligned, are loaded once for the 4 components);
    2. per component, the vertical pass ``sum_a vertical[a] * acc[k, a % SH, a // SH + :, :]``, whose tap
       offsets are whole rows, each output row's first ``OW`` values stored compact into Z from the registers
       (``gemm_taps.taps_rows``; until the twenty-first session a pass over whole rows of ``Mp`` values and a
       copy of each row's first ``OW``, the "step 3" of the measurement below).

    With ``reduce_first`` (:func:`cp_reduce_first`: groups of many channels), step 1 is instead a reduction of the
    group's channels to one phase-split plane per component, 4 components at a time (``rcoef`` (C, H*K), the
    reduction factors), then per component and row phase the horizontal pass over it (``hor`` (G, H*K, Y)):
    ``cg * SW + Y`` multiply-adds per horizontal output instead of ``cg * Y``. ``hcoef`` is then not read (and
    ``rcoef``/``hor`` are not read otherwise).

    Columns ``OW .. Mp - 1`` of each row are computed and dropped (they read past the row, into the next one or
    the slack). Against the earlier reduction, vertical and horizontal passes one component at a time, the ZF
    conv2 front end (G=48, H=2, K=6, 2 threads) went from 301-323 to 249-265 ns per component (step 1: 133, step
    2: 37, step 3: about 57, the writes of Z missing the cache); the whole layer at batch 128 ran 1.02-1.08x
    faster in 7 of 8 same-process A/B runs against that code (one run: 0.87-0.97x), 1.05x at K=12 (2026-11-26).
    ``scratch`` (threads, >= :func:`cp_scratch_size`), rows on 64-byte boundaries.
    """
    G, H, K, X = vertical.shape
    Y = hor.shape[2] if reduce_first else hcoef.shape[2]
    HK = H * K
    P = OH * OW
    RM = R * Mp
    PL = SH * RM
    plane = SH * SW * RM
    SL = TAPS1_BYTES // 4     # slack after the accumulator planes: the vertical pass's runs read past a row
    dt = Z.dtype
    nq = (HK + 3) // 4
    own = xflat.shape[0] == 0
    xin = x.reshape(x.size)
    for job in numba.prange(nb * G * nsplit):
        b, t, g, i, j0, cg = front_job(job, nsplit, G, in_offsets)
        sc = scratch[numba.get_thread_id()]
        acc = sc[:4 * PL].reshape(4, PL)
        xsrc, xbase = group_planes(own, sc, 4 * PL + SL, Mp, x, n0 + i, in_perm, j0, cg, pt, pl, SH, SW, R, Mp,
                                   xflat, i * C + j0, xin, next_plane(x, n0 + i, g + 1, in_perm, in_offsets))
        offs = np.empty(Y, np.int64)
        coef = np.empty((4, Y), dt)
        vcoef = np.empty(X, dt)
        hk4 = np.empty(4, np.int64)
        voffs = np.empty(X, np.int64)
        tmp = np.empty(TAPS1_BYTES // Z.itemsize, dt)
        for a in range(Y):
            offs[a] = (a % SW) * RM + a // SW
        for a in range(X):
            voffs[a] = ((a % SH) * R + a // SH) * Mp
        if reduce_first:
            # 4 reduced planes after the rest of the scratch row, then Mp items of slack (read only into the
            # dropped columns of the horizontal pass)
            r0 = 4 * PL + SL + (cg * plane + Mp if own else 0)
            red = sc[r0:r0 + 4 * plane + Mp]
            red[4 * plane:] = 0
            red4 = red[:4 * plane].reshape(4, plane)
            choffs = np.empty(cg, np.int64)
            for u in range(cg):
                choffs[u] = xbase + u * plane
            rc = np.empty((4, cg), dt)
            hc = np.empty(Y, dt)
        for qd in range(b * nq // nsplit, (b + 1) * nq // nsplit):
            nk = min(4, HK - 4 * qd)
            for kk in range(4):
                hk4[kk] = 4 * qd + min(kk, nk - 1)    # a short last quad repeats its last component
            if reduce_first:
                # 1. the group's channels reduced to one plane per component, 4 components per pass over them
                for kk in range(4):
                    for u in range(cg):
                        rc[kk, u] = rcoef[j0 + u, hk4[kk]]
                _taps4(red4, np.int64(0), xsrc, choffs, rc, cg, plane, np.bool_(True))
            else:
                # 1. reduction + horizontal pass, 4 components at a time (each row phase p has its own accumulators)
                for u in range(cg):
                    for kk in range(4):
                        for a in range(Y):
                            coef[kk, a] = hcoef[j0 + u, hk4[kk], a]
                    for p in range(SH):
                        src = xsrc[xbase + (u * SH + p) * SW * RM:]
                        _taps4(acc, p * RM, src, offs, coef, Y, RM, u == 0)
            # 2. + 3. vertical pass and compaction, per component
            for kk in range(nk):
                hk = hk4[kk]
                h = hk // K
                k = hk - h * K
                a_src = acc[kk]
                if reduce_first:
                    # the horizontal pass of this component's reduced plane, per row phase
                    for a in range(Y):
                        hc[a] = hor[g, hk, a]
                    for p in range(SH):
                        _taps(a_src[p * RM:(p + 1) * RM], red[kk * plane + p * SW * RM:], offs, hc, RM, False)
                for a in range(X):
                    vcoef[a] = vertical[g, h, k, a]
                taps_rows(vcoef, sc, kk * PL, voffs, X, Z[h, g * K + k], i * P, OH, OW, Mp, tmp, False)


@numba.njit(parallel=True, cache=True, nogil=True)
def shared_front(xflat, nb, C, SH, SW, R, M, in_offsets, used_ptr, used_filter, vertical, horizontal, comb,
                 comb_slot, OH, OW, Z, scratch, x, n0, in_perm, pt, pl, own):
    """Shared-separable front end.

    For image i and group g, every input channel j of the group is filtered once by every shared filter the
    group uses (``used_filter[used_ptr[g]:used_ptr[g+1]]``; vertical (S, X), horizontal (S, Y)) into ``qbuf``;
    component (h, k) of the group is then ``sum_j comb[j, h, k] * qbuf[slot, j]`` with
    ``slot = comb_slot[g, h, k]`` (an index into the group's used filters), written to
    ``Z[h, g*K + k, i*P:(i+1)*P]``. ``xflat`` holds the chunk's input packed as :func:`cp_front`'s, (nb, C, SH, SW,
    R, M) flat; with ``own`` it is not read (it may be empty): each job packs its group's planes of image ``n0 + i``
    of ``x`` (channels ``in_perm[in_offsets[g]:...]``, padding ``pt``/``pl``) into the end of its scratch row, as
    :func:`cp_front` does. One parallel job per (image, group);
    vertical passes and combinations through one ``_taps`` call site, the horizontal pass's rows stored compact into
    ``qbuf`` by ``gemm_taps.taps_rows``. ``scratch`` (threads,
    :func:`shared_scratch_size`): each thread's buffers.
    """
    G = comb_slot.shape[0]
    plane = SH * SW * R * M
    zlen = Z.shape[2]
    Zf = Z.reshape(Z.size)
    xin = x.reshape(x.size)
    for job in numba.prange(nb * G):
        g = job % G
        i = job // G
        j0 = in_offsets[g]
        cg = in_offsets[g + 1] - j0
        sc = scratch[numba.get_thread_id()]
        # the group's planes: packed here at the end of the scratch row (own), or in the chunk's packed input
        xsrc, xbase = group_planes(own, sc, sc.shape[0] - cg * plane, 0, x, n0 + i, in_perm, j0, cg, pt, pl, SH, SW,
                                   R, M, xflat, i * C + j0, xin, next_plane(x, n0 + i, g + 1, in_perm, in_offsets))
        shared_group(xsrc, xbase, g, j0, cg, SH, SW, R, M, used_ptr, used_filter, vertical, horizontal, comb,
                     comb_slot, OH, OW, sc, Zf, zlen, i * OH * OW)


@numba.njit(cache=True, nogil=True)
def shared_group(xsrc, xbase, g, j0, cg, SH, SW, R, M, used_ptr, used_filter, vertical, horizontal, comb, comb_slot,
                 OH, OW, sc, Zf, zlen, zoff):
    """One (image, group) of :func:`shared_front`: the group's planes at ``xsrc[xbase:]``, its components (h, k)
    into ``Zf[(h*G*K + g*K + k)*zlen + zoff:]`` (``P`` values each); ``sc`` the thread's scratch row (its start: the
    vertical pass's planes and the filtered maps)."""
    G, H, K = comb_slot.shape
    X = vertical.shape[1]
    Y = horizontal.shape[1]
    P = OH * OW
    plane = SH * SW * R * M
    OM = OH * M
    dt = Zf.dtype
    T = max(X, Y, cg)
    u0 = used_ptr[g]
    nu = used_ptr[g + 1] - u0
    e0 = 0
    slack = Y + TAPS1_BYTES // 4
    v = sc[e0:e0 + SW * OM + slack]
    v[SW * OM:] = 0
    e0 += SW * OM + slack
    qbuf = sc[e0:e0 + nu * cg * P]
    offs = np.empty(T, np.int64)
    coef = np.empty(T, dt)
    tmp = np.empty(TAPS1_BYTES // Zf.itemsize, dt)
    nfilt = cg * nu * (SW + 1)
    for t in range(nfilt + H * K):
        # every variable used after the _taps call is set on every path (numba miscompiled otherwise)
        if t < nfilt:
            ps = t % (SW + 1)
            cs = t // (SW + 1)
            s = cs % nu
            jj = cs // nu
            f = used_filter[u0 + s]
            if ps == SW:
                # the horizontal pass, each output row stored compact into the map's qbuf row
                for a in range(Y):
                    offs[a] = (a % SW) * OM + a // SW
                    coef[a] = horizontal[f, a]
                taps_rows(coef, v, 0, offs, Y, qbuf, (s * cg + jj) * P, OH, OW, M, tmp, False)
                continue
            nt = X
            for a in range(X):
                offs[a] = (((a % SH) * SW + ps) * R + a // SH) * M
                coef[a] = vertical[f, a]
            src = xsrc[xbase + jj * plane:xbase + (jj + 1) * plane]
            dst = v[ps * OM:(ps + 1) * OM]
            n = OM
        else:
            hk = t - nfilt
            h = hk // K
            k = hk - h * K
            sl = comb_slot[g, h, k]
            nt = cg
            for u in range(cg):
                offs[u] = (sl * cg + u) * P
                coef[u] = comb[j0 + u, h, k]
            src = qbuf
            z0 = (h * G * K + g * K + k) * zlen + zoff
            dst = Zf[z0:z0 + P]
            n = P
        _taps(dst, src, offs[:nt], coef[:nt], n, False)


@numba.njit(parallel=True, cache=True, nogil=True)
def scatter_rows(ybuf, out_perm, bias, has_bias, n0, nb, y):
    """y[n0+i, out_perm[r], :] = ybuf[r, i*P:(i+1)*P] (+ bias[out_perm[r]]); y is (N, F, P)."""
    F = ybuf.shape[0]
    P = y.shape[2]
    for job in numba.prange(nb * F):
        i = job // F
        r = job - i * F
        f = out_perm[r]
        b = bias[f] if has_bias else 0.0
        src = ybuf[r, i * P:(i + 1) * P]
        dst = y[n0 + i, f]
        for p in range(P):
            dst[p] = src[p] + b


@numba.njit(parallel=True, cache=True, nogil=True)
def im2col_phase(z, c0s, nch, KH, KW, OH, OW, col):
    """Patch matrices of several blocks of ``nch`` channels of a channel-major phase-split array z
    (Ctot, nb, sh, sw, R, M), block b starting at channel ``c0s[b]``:
    col[b, c*KH*KW + kh*KW + kw, i*OH*OW + oh*OW + ow] = z[c0s[b] + c, i, kh % sh, kw % sw, oh + kh // sh,
    ow + kw // sw], i.e. the strided conv's receptive fields, each a contiguous run of OW values.

    All blocks in one parallel region: one region per block, each followed by its GEMM, paid a hand-over between
    numba's and OpenBLAS's threads per block (ZF conv2 SVD at batch 1: four blocks' patches and GEMMs 707 ->
    620 us; conv5-sized blocks 370 -> 300 us).
    """
    nblk = c0s.shape[0]
    nb = z.shape[1]
    SH = z.shape[2]
    SW = z.shape[3]
    R = z.shape[4]
    M = z.shape[5]
    P = OH * OW
    nrows = nch * KH * KW
    if SH == 1 and SW == 1:
        # unstrided: one job per (block, channel, image) builds all KH*KW rows from its plane, which stays in L1
        # (ZF conv4's 13x13 maps: 6.3 -> 5.0 ms per batch of 128)
        for job in numba.prange(nblk * nch * nb):
            b = job // (nch * nb)
            t = job - b * (nch * nb)
            cc = t // nb
            i = t - cc * nb
            pf = z[c0s[b] + cc, i, 0, 0].reshape(R * M)
            for kh in range(KH):
                for kw in range(KW):
                    dst = col[b, (cc * KH + kh) * KW + kw, i * P:(i + 1) * P]
                    for oh in range(OH):
                        s = pf[(oh + kh) * M + kw:]
                        d = dst[oh * OW:]
                        for e in range(OW):
                            d[e] = s[e]
        return
    for job in numba.prange(nblk * nrows * nb):
        b = job // (nrows * nb)
        t = job - b * (nrows * nb)
        r = t // nb
        i = t - r * nb
        c = c0s[b] + r // (KH * KW)
        kh = (r // KW) % KH
        kw = r % KW
        plane = z[c, i, kh % SH, kw % SW]
        dst = col[b, r, i * P:(i + 1) * P]
        r0 = kh // SH
        m0 = kw // SW
        for oh in range(OH):
            s = plane[r0 + oh, m0:m0 + OW]
            d = dst[oh * OW:(oh + 1) * OW]
            for e in range(OW):
                d[e] = s[e]


from .plan import watch as _watch  # noqa: E402  (planned kernels: kernels/cpu/plan.py)
_watch(__name__)
