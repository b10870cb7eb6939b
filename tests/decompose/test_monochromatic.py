"""Monochromatic approximation: exact recovery of colour (x) spatial structure, clustering, refit, validation."""
import numpy as np
import pytest

from npconv.decompose.monochromatic import MonochromaticResult, monochromatic

DTYPES = [np.float32, np.float64]


def _mono_tensor(rng, F, C, X, Y, colors, sizes=None):
    """Filters built as colour (x) spatial with ``colors`` distinct unit colours; returns W and the truth."""
    cols = rng.standard_normal((colors, C))
    cols /= np.linalg.norm(cols, axis=1, keepdims=True)
    if sizes is None:
        assign = np.repeat(np.arange(colors), F // colors)
    else:
        assign = np.repeat(np.arange(colors), sizes)
    rng.shuffle(assign)
    spatial = rng.standard_normal((F, X, Y))
    W = np.empty((F, C, X, Y))
    for f in range(F):            # explicit outer products, independent of the code under test
        for c in range(C):
            W[f, c] = cols[assign[f], c] * spatial[f]
    return W, cols, assign


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F,C,X,Y,colors", [(12, 3, 5, 5, 3), (16, 3, 3, 4, 4), (8, 2, 1, 1, 2), (10, 3, 3, 3, 5)])
def test_exact_recovery(rng, dtype, F, C, X, Y, colors):
    W, cols, assign = _mono_tensor(rng, F, C, X, Y, colors)
    W = W.astype(dtype)
    res = monochromatic(W, colors, random_state=0)
    assert isinstance(res, MonochromaticResult)
    c, a, s = res
    assert c.shape == (colors, C) and a.shape == (F,) and s.shape == (F, X, Y)
    assert c.dtype == s.dtype == dtype and a.dtype == np.int64
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(res.to_tensor(), W, atol=tol * np.abs(W).max())
    assert res.error < tol
    assert _same_partition(a, assign)
    assert np.bincount(a, minlength=colors).tolist() == [F // colors] * colors


def test_unequal_clusters(rng):
    W, _, assign = _mono_tensor(rng, 12, 3, 3, 3, 3, sizes=[2, 4, 6])
    plain = monochromatic(W, 3, equal_size=False, random_state=0)
    assert plain.error < 1e-10 and _same_partition(plain.assignment, assign)
    balanced = monochromatic(W, 3, equal_size=True, random_state=0)
    assert np.bincount(balanced.assignment).tolist() == [4, 4, 4]
    assert balanced.error > 1e-3                      # the balanced constraint cannot fit this structure


def test_more_colours_than_channels(rng):
    W, _, _ = _mono_tensor(rng, 10, 3, 3, 3, 5)
    res = monochromatic(W, 5, random_state=1)
    assert res.colors.shape == (5, 3) and res.error < 1e-10


def test_refit_is_least_squares(rng):
    """Given the colours, each spatial map satisfies the normal equations M_f^T c = s_f ||c||^2."""
    W = rng.standard_normal((8, 3, 3, 3))
    res = monochromatic(W, 2, random_state=0)
    for f in range(8):
        c = res.colors[res.assignment[f]]
        M = W[f].reshape(3, 9)
        np.testing.assert_allclose(M.T @ c, res.spatial[f].ravel() * (c @ c), atol=1e-12)
    e1, e2, e3 = res.errors
    assert e1 <= e2 + 1e-12 and e3 == pytest.approx(np.linalg.norm(W - res.to_tensor()) / np.linalg.norm(W))
    np.testing.assert_allclose(np.linalg.norm(res.colors, axis=1), 1.0)


def test_data_metric(rng):
    W = rng.standard_normal((8, 3, 3, 3))
    P = rng.standard_normal((400, 27)) * np.linspace(0.2, 2.0, 27)
    S = P.T @ P / 400
    r_data = monochromatic(W, 2, random_state=0, data_cov=S)
    r_plain = monochromatic(W, 2, random_state=0)
    np.testing.assert_array_equal(r_data.assignment, r_plain.assignment)     # same clustering, refit differs
    err = lambda r: np.linalg.norm((W.reshape(8, -1) - r.to_tensor().reshape(8, -1)) @ P.T)  # noqa: E731
    assert err(r_data) < err(r_plain)
    Wm, _, _ = _mono_tensor(rng, 8, 3, 3, 3, 2)
    assert monochromatic(Wm, 2, random_state=0, data_cov=S).error < 1e-9
    with pytest.raises(ValueError, match="shape"):
        monochromatic(W, 2, data_cov=np.eye(5))


def test_deterministic_and_callback(rng):
    W = rng.standard_normal((16, 3, 3, 3))
    seen = []
    r1 = monochromatic(W, 4, random_state=5, callback=seen.append)
    r2 = monochromatic(W, 4, random_state=5)
    np.testing.assert_array_equal(r1.assignment, r2.assignment)
    np.testing.assert_array_equal(r1.spatial, r2.spatial)
    assert seen and "inertia" in seen[0]


@pytest.mark.parametrize("colors,exc", [(0, ValueError), (9, ValueError), (2.0, TypeError)])
def test_bad_colors(rng, colors, exc):
    with pytest.raises(exc, match="colors"):
        monochromatic(rng.standard_normal((8, 3, 3, 3)), colors)


@pytest.mark.parametrize("W,exc", [(np.zeros((4, 3, 3, 3)), ValueError), (np.full((4, 3, 3, 3), np.nan), ValueError),
                                   (np.ones((4, 3, 3)), ValueError), (np.ones((4, 3, 3, 3), np.int64), TypeError)])
def test_bad_tensor(W, exc):
    with pytest.raises(exc):
        monochromatic(W, 2)


def test_result_validation():
    with pytest.raises(ValueError, match="assignment must lie"):
        MonochromaticResult(np.ones((2, 3)), np.array([0, 2]), np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="spatial"):
        MonochromaticResult(np.ones((2, 3)), np.array([0, 1]), np.ones((3, 3, 3)))
    with pytest.raises(TypeError, match="dtype"):
        MonochromaticResult(np.ones((2, 3)), np.array([0, 1]), np.ones((2, 3, 3), np.float32))
