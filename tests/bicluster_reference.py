"""Independent references for the biclustered layers' GPU tests: random factors with given group sizes, and the dense
kernel the factors stand for, rebuilt entry by entry from the definitions (plain loops, float64).

Used by tests/kernels/test_cuda_bicluster_*.py and tests/gpu/test_gpu_bicluster.py; nothing here calls npconv.
"""
from __future__ import annotations

import numpy as np


def groups(rng, n, sizes):
    """(perm, offsets) of a random grouping of ``n`` channels into groups of the given sizes."""
    sizes = [int(s) for s in sizes]
    if sum(sizes) != n or min(sizes) < 1:
        raise ValueError(f"group sizes {sizes} must be >= 1 and add up to {n}")
    return rng.permutation(n).astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def cp_factors(rng, C, F, X, Y, in_sizes, out_sizes, K, dtype):
    """(in_perm, in_off, reduce (C, NH, K), vertical (G, NH, K, X), horizontal (G, NH, K, Y), expand (F, G, K),
    out_perm, out_off)."""
    G, NH = len(in_sizes), len(out_sizes)
    in_perm, in_off = groups(rng, C, in_sizes)
    out_perm, out_off = groups(rng, F, out_sizes)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return (in_perm, in_off, r(C, NH, K), r(G, NH, K, X), r(G, NH, K, Y), r(F, G, K), out_perm, out_off)


def svd_factors(rng, C, F, X, Y, in_sizes, out_sizes, K1, K2, dtype):
    """(in_perm, in_off, reduce (C, NH, K1), spatial (G, NH, K2, K1, X, Y), expand (F, G, K2), out_perm, out_off)."""
    G, NH = len(in_sizes), len(out_sizes)
    in_perm, in_off = groups(rng, C, in_sizes)
    out_perm, out_off = groups(rng, F, out_sizes)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return (in_perm, in_off, r(C, NH, K1), r(G, NH, K2, K1, X, Y), r(F, G, K2), out_perm, out_off)


def shared_factors(rng, C, F, X, Y, in_sizes, out_sizes, K, S, dtype):
    """(in_perm, in_off, reduce (C, NH, K), assign (G, NH, K), vertical (S, X), horizontal (S, Y), expand (F, G, K),
    out_perm, out_off); filter S-1 is used by no component when S > 1 (an unused shared filter)."""
    G, NH = len(in_sizes), len(out_sizes)
    in_perm, in_off = groups(rng, C, in_sizes)
    out_perm, out_off = groups(rng, F, out_sizes)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    assign = rng.integers(0, max(1, S - 1), size=(G, NH, K)).astype(np.int64)
    return (in_perm, in_off, r(C, NH, K), assign, r(S, X), r(S, Y), r(F, G, K), out_perm, out_off)


#: the (X, row stride) pairs of the CP front end with an entry point of their own (see _bicluster.cu)
CP_SPECIALISED = {(3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (7, 2)}


def cp_front_name(X, SH):
    """The bic_cp_front entry point the GPU path should launch for X x Y filters at row stride SH."""
    return f"bic_cp_front_x{X}s{SH}" if (X, SH) in CP_SPECIALISED else "bic_cp_front"


def make_factors(kind, rng, dtype, C, F, X, Y, in_sizes, out_sizes, ranks):
    """Factors of ``kind`` ("cp": ranks K, "svd": (K1, K2), "shared": (K, S))."""
    if kind == "cp":
        return cp_factors(rng, C, F, X, Y, in_sizes, out_sizes, ranks, dtype)
    if kind == "svd":
        return svd_factors(rng, C, F, X, Y, in_sizes, out_sizes, *ranks, dtype)
    return shared_factors(rng, C, F, X, Y, in_sizes, out_sizes, *ranks, dtype)


def dense_kernel(kind, factors):
    """The dense (F, C, X, Y) kernel the factors of ``kind`` stand for, in the original channel order, float64."""
    f = [np.asarray(a) for a in factors]
    if kind == "cp":
        in_perm, in_off, red, vert, hor, exp, out_perm, out_off = f
        X, Y = vert.shape[3], hor.shape[3]
    elif kind == "svd":
        in_perm, in_off, red, sp, exp, out_perm, out_off = f
        X, Y = sp.shape[4], sp.shape[5]
    elif kind == "shared":
        in_perm, in_off, red, assign, vs, hs, exp, out_perm, out_off = f
        X, Y = vs.shape[1], hs.shape[1]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    C, F = in_perm.size, out_perm.size
    in_group = np.zeros(C, int)
    out_group = np.zeros(F, int)
    for g in range(in_off.size - 1):
        in_group[in_off[g]:in_off[g + 1]] = g
    for h in range(out_off.size - 1):
        out_group[out_off[h]:out_off[h + 1]] = h
    red = red.astype(np.float64)
    exp = exp.astype(np.float64)
    W = np.zeros((F, C, X, Y))
    for i in range(F):
        h = out_group[i]
        for j in range(C):
            g = in_group[j]
            blk = np.zeros((X, Y))
            if kind == "cp":
                for k in range(red.shape[2]):
                    blk += exp[i, g, k] * red[j, h, k] * np.outer(vert[g, h, k], hor[g, h, k])
            elif kind == "svd":
                for k2 in range(sp.shape[2]):
                    for k1 in range(sp.shape[3]):
                        blk += exp[i, g, k2] * sp[g, h, k2, k1].astype(np.float64) * red[j, h, k1]
            else:
                for k in range(red.shape[2]):
                    s = assign[g, h, k]
                    blk += exp[i, g, k] * red[j, h, k] * np.outer(vs[s], hs[s])
            W[out_perm[i], in_perm[j]] = blk
    return W
