"""NumPy references for the GPU ops, written independently of the kernels (float64 results).

Convolution references live in tests/reference.py (``conv2d_naive``, ``conv2d_einsum``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["max_pool_ref", "avg_pool_ref", "lrn_ref", "softmax_ref", "bias_relu_ref", "normalize_ref", "tolerance"]


def _canvas(H, W, kh, kw, sh, sw, ph, pw, oh, ow):
    """Height and width of a canvas holding the padded input and every window (ceil-mode windows may reach
    past the padded input)."""
    return max(H + 2 * ph, (oh - 1) * sh + kh), max(W + 2 * pw, (ow - 1) * sw + kw)


def max_pool_ref(x, kernel, stride, padding, out_hw):
    """Max over each window; padding and cells past it never win (they are -inf)."""
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, padding, out_hw
    Hc, Wc = _canvas(H, W, kh, kw, sh, sw, ph, pw, oh, ow)
    canvas = np.full((N, C, Hc, Wc), -np.inf)
    canvas[:, :, ph:ph + H, pw:pw + W] = x
    y = np.empty((N, C, oh, ow))
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = canvas[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].max(axis=(2, 3))
    return y


def avg_pool_ref(x, kernel, stride, padding, out_hw, count_include_pad):
    """Window sum over the input cells, divided by the number of cells of the window that lie in the padded
    input (``count_include_pad``) or in the input itself."""
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (oh, ow) = kernel, stride, padding, out_hw
    Hc, Wc = _canvas(H, W, kh, kw, sh, sw, ph, pw, oh, ow)
    canvas = np.zeros((N, C, Hc, Wc))
    canvas[:, :, ph:ph + H, pw:pw + W] = x
    in_input = np.zeros((Hc, Wc))
    in_input[ph:ph + H, pw:pw + W] = 1
    in_padded = np.zeros((Hc, Wc))
    in_padded[:H + 2 * ph, :W + 2 * pw] = 1
    count = in_padded if count_include_pad else in_input
    y = np.empty((N, C, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = (slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw))
            y[:, :, i, j] = canvas[(..., *win)].sum(axis=(2, 3)) / count[win].sum()
    return y


def lrn_ref(x, size, alpha, beta, k):
    """x / (k + alpha/size * sum of squares over channels c - size//2 .. c + (size-1)//2 that exist)^beta."""
    x = np.asarray(x, np.float64)
    C = x.shape[1]
    y = np.empty_like(x)
    for c in range(C):
        acc = np.zeros_like(x[:, 0])
        for cc in range(c - size // 2, c + (size - 1) // 2 + 1):
            if 0 <= cc < C:
                acc += x[:, cc] ** 2
        y[:, c] = x[:, c] / (k + alpha / size * acc) ** beta
    return y


def softmax_ref(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def bias_relu_ref(y, b):
    y = np.asarray(y, np.float64)
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape((1, -1) + (1,) * (y.ndim - 2))
    return np.maximum(y, 0)


def normalize_ref(x, mean, scale):
    x = np.asarray(x, np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - np.asarray(mean, np.float64).reshape(shape)) * np.asarray(scale, np.float64).reshape(shape)


def tolerance(dtype):
    """(rtol, atol) for comparing a float32/float64 result with a float64 reference."""
    return (2e-4, 2e-4) if np.dtype(dtype) == np.float32 else (1e-10, 1e-10)
