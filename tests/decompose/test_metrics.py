"""Error metrics, the data distance, and the input statistics (patch / input second moments)."""
import numpy as np
import pytest
from reference import count_calls

from npconv.decompose.metrics import (covariance_sqrt, data_distance, frobenius_error, input_covariance,
                                      patch_covariance, relative_error)
from npconv.decompose.svd import svd_lowrank


def test_frobenius_and_relative(rng):
    W = rng.standard_normal((6, 5))
    A = W + 0.1 * rng.standard_normal((6, 5))
    d = np.sqrt(((W - A) ** 2).sum())
    assert frobenius_error(W, A) == pytest.approx(d)
    assert relative_error(W, A) == pytest.approx(d / np.sqrt((W ** 2).sum()))
    res = svd_lowrank(W, 2)
    assert relative_error(W, res) == pytest.approx(res.error, rel=1e-10)
    with pytest.raises(ValueError, match="shape"):
        frobenius_error(W, A[:3])
    with pytest.raises(ValueError, match="all zeros"):
        relative_error(np.zeros((2, 2)), np.ones((2, 2)))
    with pytest.raises(TypeError):
        frobenius_error(W, [[1.0]])


def _naive_patches(x, kh, kw, stride, pad, dil):
    sh, sw = stride
    pt, pb, pl, pr = pad
    dh, dw = dil
    N, C, H, W = x.shape
    rows = []
    for n in range(N):
        oh = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
        for i in range(oh):
            for j in range(ow):
                p = []
                for c in range(C):
                    for a in range(kh):
                        for b in range(kw):
                            r, q = i * sh - pt + a * dh, j * sw - pl + b * dw
                            p.append(x[n, c, r, q] if 0 <= r < H and 0 <= q < W else 0.0)
                rows.append(p)
    return np.array(rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel,stride,pad,dil", [((3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),
                                                   ((2, 3), (2, 1), (1, 0, 2, 1), (1, 1)),
                                                   ((3, 2), (1, 2), (1, 1, 1, 1), (2, 1))])
def test_patch_covariance(rng, dtype, kernel, stride, pad, dil):
    x = rng.standard_normal((3, 2, 7, 6)).astype(dtype)
    P = _naive_patches(x.astype(np.float64), *kernel, stride, pad, dil)
    S = patch_covariance(x, kernel, stride=stride, padding=pad, dilation=dil, chunk=2)
    np.testing.assert_allclose(S, P.T @ P / P.shape[0], rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-6)
    Sc = patch_covariance(x, kernel, stride=stride, padding=pad, dilation=dil, center=True)
    np.testing.assert_allclose(Sc, np.cov(P.T, bias=True), atol=1e-5)


def test_patch_covariance_subsample(rng):
    x = rng.standard_normal((2, 1, 6, 6))
    full = patch_covariance(x, 3)
    assert np.allclose(patch_covariance(x, 3, max_patches=10 ** 6), full)
    s1 = patch_covariance(x, 3, max_patches=20, random_state=0)
    s2 = patch_covariance(x, 3, max_patches=20, random_state=0)
    np.testing.assert_array_equal(s1, s2)
    assert np.linalg.eigvalsh(s1).min() > -1e-12 and not np.allclose(s1, full)
    with pytest.raises(ValueError):
        patch_covariance(x, 7)                   # no output position
    with pytest.raises(ValueError):
        patch_covariance(np.ones((2, 6, 6)), 3)


def test_input_covariance(rng):
    x = rng.standard_normal((50, 4))
    np.testing.assert_allclose(input_covariance(x), x.T @ x / 50)
    np.testing.assert_allclose(input_covariance(x, center=True), np.cov(x.T, bias=True))
    np.testing.assert_allclose(input_covariance(x.reshape(50, 2, 2)), x.T @ x / 50)
    with pytest.raises(ValueError, match="non-finite"):
        input_covariance(np.array([[np.nan, 1.0]]))


def test_data_distance(rng):
    X = rng.standard_normal((5, 4))
    W = rng.standard_normal((3, 4))
    f = lambda x: x @ W.T            # noqa: E731
    assert data_distance(f, f, X) == 0.0
    assert data_distance(f, lambda x: 1.1 * (x @ W.T), X) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="output shapes"):
        data_distance(f, lambda x: x, X)
    with pytest.raises(TypeError, match="callable"):
        data_distance(f, 3, X)
    with pytest.raises(ValueError, match="all zeros"):
        data_distance(lambda x: 0 * x, lambda x: x, X)


def test_covariance_sqrt(rng):
    A = rng.standard_normal((5, 3))
    S = A @ A.T                                     # rank 3, singular
    L = covariance_sqrt(S, 5)
    np.testing.assert_allclose(L @ L.T, S, atol=1e-12)
    with pytest.raises(ValueError, match="positive semi-definite"):
        covariance_sqrt(-S - np.eye(5), 5)
    with pytest.raises(TypeError):
        covariance_sqrt(np.eye(5, dtype=int), 5)


def test_as_covariance_checks_a_matrix_once(rng, monkeypatch):
    """as_covariance returns a read-only symmetrised float64 copy; that copy handed back is returned as it is,
    without another eigenvalue check; a writable copy of it, or another size, is checked again."""
    from npconv.decompose import metrics
    checks = count_calls(monkeypatch, metrics, "_checked_eigh")
    A = rng.standard_normal((6, 6))
    S = (A @ A.T).astype(np.float32)
    c = metrics.as_covariance(S, 6)
    assert c.dtype == np.float64 and not c.flags.writeable and len(checks) == 1
    np.testing.assert_allclose(c, S.astype(np.float64), rtol=1e-6)
    assert metrics.as_covariance(c, 6) is c and len(checks) == 1
    with pytest.raises(ValueError, match="must be read-only|assignment destination is read-only"):
        c[0, 0] = 1.0
    fresh = c.copy()
    assert metrics.as_covariance(fresh, 6) is not fresh and len(checks) == 2
    with pytest.raises(ValueError, match=r"data_cov must have shape \(5, 5\)"):
        metrics.as_covariance(c, 5)
    bad = c.copy()
    bad[0, 1] += 1.0                                       # no longer symmetric: the check still sees it
    with pytest.raises(ValueError, match="symmetric"):
        metrics.as_covariance(bad, 6)
