"""Numba kernels of the biclustered (CP, SVD) and shared-separable conv layers.

Layouts (``nb`` images of a batch chunk, ``P = OH * OW`` output positions):

* The phase-split padded layout (``_pack.pack_plane``) stores a padded input plane split by the row and column
  phases of the stride, ``[p, q, r, m] = x_padded[r * sh + p, m * sw + q]``. Every later pass then reads
  contiguous runs: a horizontal tap ``b`` at stride ``sw`` is the contiguous slice ``[b // sw, b // sw + OW)``
  of phase ``b % sw``; the zero padding is materialised once.
* ``pack_phase`` packs a chunk's input (padded, phase-split, channels in group order) for every form, reading
  the input in its memory order.
* The CP front end ``cp_front`` runs, for one (image, group g, output group h, component k) per parallel job,
  the C_g -> 1 reduction, the vertical X-tap pass (row stride) and the horizontal Y-tap pass in a small
  per-thread scratch buffer, and writes the component's P outputs to ``Z[h, g * K + k, i * P:(i + 1) * P]``.
  The inner loops run over contiguous rows, so the compiler vectorises them.
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


def cp_scratch_size(sh, sw, R, M, OH, Y):
    """Items of one thread's scratch row for :func:`cp_front`."""
    plane = sh * sw * R * M
    return plane + sw * OH * M + Y + OH * M


def shared_scratch_size(cg_max, nu_max, sw, M, OH, OW, Y):
    """Items of one thread's scratch row for :func:`shared_front` (largest input group ``cg_max``, ``nu_max``
    shared filters used per group)."""
    return sw * OH * M + Y + OH * M + nu_max * cg_max * OH * OW


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


@numba.njit(parallel=True, cache=True, nogil=True)
def cp_front(xs, in_offsets, reduce, vertical, horizontal, OH, OW, nsplit, Z, scratch):
    """CP front end: Z[h, g*K + k, i*P:(i+1)*P] = horiz_k * (vert_k * (sum_j reduce[j, h, k] xs[i, j])).

    ``xs`` (nb, C, sh, sw, R, M) is the chunk's input packed by :func:`pack_phase` (padded, phase-split, channels
    in group order, image-major). One parallel job per (image i, input group g, slice b of the group's H*K
    components; ``nsplit`` slices, more than one only when there are too few groups to keep the threads busy);
    for each of its components: the reduction into ``zf`` (sh*sw*R*M), the vertical pass of every column phase
    q into ``v`` (sw, OH, M) (tap a reads row phase a % sh from row a // sh on: one flat run per tap over the
    whole plane), the horizontal pass into ``o`` (OH, M) (tap b reads column phase b % sw from column b // sw on), and the
    compaction of ``o``'s first OW columns per row into Z. All passes go through ONE inlined ``_taps`` call
    site (compile time). reduce (C, H, K); vertical (G, H, K, X); horizontal (G, H, K, Y); Z (H, G*K, nb*P).
    ``scratch`` (threads, :func:`cp_scratch_size`) holds each thread's buffers: allocating them per job cost 20% of
    the kernel's time on ZF conv2 (576 components).
    """
    G, H, K, X = vertical.shape
    Y = horizontal.shape[3]
    nb, C, SH, SW, R, M = xs.shape
    P = OH * OW
    plane = SH * SW * R * M
    OM = OH * M
    dt = Z.dtype
    HK = H * K
    T = max(X, Y, C)
    xflat = xs.reshape(nb * C * plane)
    for job in numba.prange(nb * G * nsplit):
        b = job % nsplit
        t = job // nsplit
        g = t % G
        i = t // G
        j0 = in_offsets[g]
        cg = in_offsets[g + 1] - j0
        sc = scratch[numba.get_thread_id()]
        xs1 = xflat[(i * C + j0) * plane:(i * C + j0 + cg) * plane]
        zf = sc[:plane]
        e0 = plane
        v = sc[e0:e0 + SW * OM + Y]
        v[SW * OM:] = 0          # the horizontal taps read up to Y values past the last phase's run
        e0 += SW * OM + Y
        o = sc[e0:e0 + OM]
        offs = np.empty(T, np.int64)
        coef = np.empty(T, dt)
        for hk in range(b * HK // nsplit, (b + 1) * HK // nsplit):
            h = hk // K
            k = hk - h * K
            # passes: 0 = reduction into zf, 1..SW = vertical pass of column phase q into v, SW+1 = horizontal
            for ps in range(SW + 2):
                if ps == 0:
                    nt = cg
                    for u in range(cg):
                        offs[u] = u * plane
                        coef[u] = reduce[j0 + u, h, k]
                    src = xs1
                    dst = zf
                    n = plane
                elif ps <= SW:
                    q = ps - 1
                    nt = X
                    for a in range(X):
                        offs[a] = (((a % SH) * SW + q) * R + a // SH) * M
                        coef[a] = vertical[g, h, k, a]
                    src = zf
                    dst = v[q * OM:(q + 1) * OM]
                    n = OM
                else:
                    nt = Y
                    for a in range(Y):
                        offs[a] = (a % SW) * OM + a // SW
                        coef[a] = horizontal[g, h, k, a]
                    src = v
                    dst = o
                    n = OM
                _taps(dst, src, offs[:nt], coef[:nt], n, False)
            zrow = Z[h, g * K + k, i * P:(i + 1) * P]
            for oi in range(OH):
                d = zrow[oi * OW:(oi + 1) * OW]
                sr = o[oi * M:oi * M + OW]
                for e in range(OW):
                    d[e] = sr[e]


@numba.njit(parallel=True, cache=True, nogil=True)
def shared_front(xs, in_offsets, used_ptr, used_filter, vertical, horizontal, comb, comb_slot, OH, OW, Z, scratch):
    """Shared-separable front end.

    For image i and group g, every input channel j of the group is filtered once by every shared filter the
    group uses (``used_filter[used_ptr[g]:used_ptr[g+1]]``; vertical (S, X), horizontal (S, Y)) into ``qbuf``;
    component (h, k) of the group is then ``sum_j comb[j, h, k] * qbuf[slot, j]`` with
    ``slot = comb_slot[g, h, k]`` (an index into the group's used filters), written to
    ``Z[h, g*K + k, i*P:(i+1)*P]``. ``xs`` as in :func:`cp_front`. One parallel job per (image, group);
    passes as in :func:`cp_front`, through one ``_taps`` call site. ``scratch`` (threads,
    :func:`shared_scratch_size`): each thread's buffers.
    """
    nb, C, SH, SW, R, M = xs.shape
    G, H, K = comb_slot.shape
    X = vertical.shape[1]
    Y = horizontal.shape[1]
    P = OH * OW
    plane = SH * SW * R * M
    OM = OH * M
    dt = Z.dtype
    T = max(X, Y, C)
    xflat = xs.reshape(nb * C * plane)
    for job in numba.prange(nb * G):
        g = job % G
        i = job // G
        j0 = in_offsets[g]
        cg = in_offsets[g + 1] - j0
        sc = scratch[numba.get_thread_id()]
        xs1 = xflat[(i * C + j0) * plane:(i * C + j0 + cg) * plane]
        u0 = used_ptr[g]
        nu = used_ptr[g + 1] - u0
        e0 = 0
        v = sc[e0:e0 + SW * OM + Y]
        v[SW * OM:] = 0
        e0 += SW * OM + Y
        o = sc[e0:e0 + OM]
        e0 += OM
        qbuf = sc[e0:e0 + nu * cg * P]
        offs = np.empty(T, np.int64)
        coef = np.empty(T, dt)
        nfilt = cg * nu * (SW + 1)
        for t in range(nfilt + H * K):
            # every variable used after the _taps call is set on every path (numba miscompiled otherwise)
            post = 0          # 0: nothing, 1: compact o into qbuf row `prow`
            prow = 0
            h = 0
            row = 0
            if t < nfilt:
                ps = t % (SW + 1)
                cs = t // (SW + 1)
                s = cs % nu
                jj = cs // nu
                f = used_filter[u0 + s]
                if ps < SW:
                    nt = X
                    for a in range(X):
                        offs[a] = (((a % SH) * SW + ps) * R + a // SH) * M
                        coef[a] = vertical[f, a]
                    src = xs1[jj * plane:(jj + 1) * plane]
                    dst = v[ps * OM:(ps + 1) * OM]
                    n = OM
                else:
                    nt = Y
                    for a in range(Y):
                        offs[a] = (a % SW) * OM + a // SW
                        coef[a] = horizontal[f, a]
                    src = v
                    dst = o
                    n = OM
                    post = 1
                    prow = s * cg + jj
            else:
                hk = t - nfilt
                h = hk // K
                k = hk - h * K
                row = g * K + k
                sl = comb_slot[g, h, k]
                nt = cg
                for u in range(cg):
                    offs[u] = (sl * cg + u) * P
                    coef[u] = comb[j0 + u, h, k]
                src = qbuf
                dst = Z[h, row, i * P:(i + 1) * P]
                n = P
            _taps(dst, src, offs[:nt], coef[:nt], n, False)
            if post == 1:
                qr = qbuf[prow * P:(prow + 1) * P]
                for oi in range(OH):
                    d = qr[oi * OW:(oi + 1) * OW]
                    sr = o[oi * M:oi * M + OW]
                    for e in range(OW):
                        d[e] = sr[e]


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
