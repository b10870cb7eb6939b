"""``npconv.decompose._linalg``: the positive semi-definite solver of the data-metric fits, against
``numpy.linalg.solve`` and the definition of a solution."""
import numpy as np

from npconv.decompose import _linalg as bd


def test_psd_solver_takes_cholesky_when_definite_and_falls_back_when_singular(rng, monkeypatch):
    """``_solve_psd``: on a positive-definite system the Cholesky path answers (no least-squares call) with the
    solution of ``numpy.linalg.solve``; on singular consistent systems (exactly singular, and singular up to
    rounding, where Cholesky may still succeed with tiny pivots) the QR fallback answers with a finite exact
    solution of ``G z = r``."""
    import scipy.linalg

    calls = []
    real = scipy.linalg.lstsq
    monkeypatch.setattr(scipy.linalg, "lstsq", lambda *a, **k: calls.append(1) or real(*a, **k))
    A = rng.standard_normal((40, 60))
    G = A @ A.T
    r = rng.standard_normal((40, 3))
    np.testing.assert_allclose(bd.solve_psd(G, r), np.linalg.solve(G, r), rtol=1e-9, atol=1e-12)
    assert calls == []
    for jitter in (0.0, 1e-13):
        B = rng.standard_normal((40, 25))
        G = B @ B.T + jitter * np.eye(40)                          # jitter: definite, but only by rounding
        r = G @ rng.standard_normal((40, 2))                      # consistent: r in the range of G
        calls.clear()
        z = bd.solve_psd(G, r)
        assert calls == [1]
        assert np.all(np.isfinite(z))
        np.testing.assert_allclose(G @ z, r, rtol=0, atol=1e-8 * np.abs(r).max())
