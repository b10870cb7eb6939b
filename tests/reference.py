"""Independent reference implementations for the tests: plain nested loops, written separately from npconv."""
from __future__ import annotations

import numpy as np


def conv2d_naive(x, w, b=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """Direct definition of a grouped, dilated, strided, zero-padded cross-correlation, in float64."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    N, C, H, W = x.shape
    F, Cg, KH, KW = w.shape
    sh, sw = stride
    pt, pb, pl, pr = padding
    dh, dw = dilation
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    Fg = F // groups
    out = np.zeros((N, F, OH, OW))
    for n in range(N):
        for f in range(F):
            g = f // Fg
            for oh in range(OH):
                for ow in range(OW):
                    s = 0.0 if b is None else float(b[f])
                    for c in range(Cg):
                        for kh in range(KH):
                            ih = oh * sh - pt + kh * dh
                            if ih < 0 or ih >= H:
                                continue
                            for kw in range(KW):
                                iw = ow * sw - pl + kw * dw
                                if 0 <= iw < W:
                                    s += w[f, c, kh, kw] * x[n, g * Cg + c, ih, iw]
                    out[n, f, oh, ow] = s
    return out


def conv2d_einsum(x, w, b=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """The same definition vectorised over pixels (for shapes too large for the naive loops), in float64."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    N, C, H, W = x.shape
    F, Cg, KH, KW = w.shape
    sh, sw = stride
    pt, pb, pl, pr = padding
    dh, dw = dilation
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    Fg = F // groups
    out = np.zeros((N, F, OH, OW))
    for g in range(groups):
        xs = xp[:, g * Cg:(g + 1) * Cg]
        for kh in range(KH):
            for kw in range(KW):
                patch = xs[:, :, kh * dh: kh * dh + sh * (OH - 1) + 1: sh, kw * dw: kw * dw + sw * (OW - 1) + 1: sw]
                out[:, g * Fg:(g + 1) * Fg] += np.einsum("fc,nchw->nfhw", w[g * Fg:(g + 1) * Fg, :, kh, kw], patch)
    if b is not None:
        out += np.asarray(b, np.float64)[None, :, None, None]
    return out


def tolerance(dtype):
    """(rtol, atol) for comparing a float32/float64 computation with a float64 reference."""
    return (2e-4, 2e-4) if np.dtype(dtype) == np.float32 else (1e-10, 1e-10)


def count_calls(monkeypatch, owner, name):
    """Wrap ``owner.name`` (for the test's duration) so that each call appends to the returned list and then runs
    the real function: a test can tell whether a code path was taken."""
    calls = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls
