"""Biclustered approximation (section 4.4): exact recovery of synthetic bicluster structure with permuted
channels, group recovery up to relabelling, rebuild, cost, determinism and validation."""
import numpy as np
import pytest

from npconv.decompose import cost
from npconv.decompose.bicluster import (BiclusterCPResult, BiclusterSVDResult, bicluster, channel_groups,
                                        max_bicluster_ranks)

DTYPES = [np.float32, np.float64]


def _groups(rng, n, k):
    """Random partition of range(n) into k groups of near-equal size (list of index arrays)."""
    perm = rng.permutation(n)
    return [np.sort(a) for a in np.array_split(perm, k)]


def _near(rng, base, rows, spread=0.35):
    """Rows close to a group's base vector: what makes the channels of a group cluster together."""
    return base[None, :] + spread * rng.standard_normal((rows, base.shape[0]))


def _synthetic(rng, F, C, X, Y, G, H, form, K):
    """W (F, C, X, Y) whose (input group g, output group h) blocks are exactly of the given structure; the
    channels of each group are scattered over the channel axes (random groups)."""
    ig, og = _groups(rng, C, G), _groups(rng, F, H)
    W = np.zeros((F, C, X, Y))
    for g, ci in enumerate(ig):
        for h, fo in enumerate(og):
            if form == "cp":
                A = _near(rng, rng.standard_normal(K), ci.size).T      # (K, C_g) input factor
                E = _near(rng, rng.standard_normal(K), fo.size)        # (F_h, K) output factor
                V, Hz = rng.standard_normal((K, X)), rng.standard_normal((K, Y))
                blk = np.einsum("fk,kc,kx,ky->fcxy", E, A, V, Hz)
            else:
                K1, K2 = K
                R = _near(rng, rng.standard_normal(K1), ci.size).T     # (K1, C_g)
                S = rng.standard_normal((K2, K1, X, Y))
                E = _near(rng, rng.standard_normal(K2), fo.size)       # (F_h, K2)
                blk = np.einsum("fm,mkxy,kc->fcxy", E, S, R)
            W[np.ix_(fo, ci)] = blk
    return W, ig, og


def _partition(groups):
    return {frozenset(int(v) for v in g) for g in groups}


def _rebuild(res):
    """Independent rebuild of W~ from the stacked factors, one channel pair at a time."""
    F, C, X, Y = res.shape
    W = np.zeros((F, C, X, Y))
    in_g = np.repeat(np.arange(len(res.in_offsets) - 1), np.diff(res.in_offsets))
    out_g = np.repeat(np.arange(len(res.out_offsets) - 1), np.diff(res.out_offsets))
    for i, f in enumerate(res.out_perm):
        h = out_g[i]
        for j, c in enumerate(res.in_perm):
            g = in_g[j]
            if isinstance(res, BiclusterCPResult):
                for k in range(res.rank):
                    W[f, c] += (res.expand[i, g, k] * res.reduce[j, h, k]
                                * np.outer(res.vertical[g, h, k], res.horizontal[g, h, k]))
            else:
                for m in range(res.spatial.shape[2]):
                    for k in range(res.spatial.shape[3]):
                        W[f, c] += res.expand[i, g, m] * res.reduce[j, h, k] * res.spatial[g, h, m, k]
    return W


@pytest.mark.parametrize("dtype", DTYPES)
def test_cp_recovers_synthetic_bicluster_structure(rng, dtype):
    W, ig, og = _synthetic(rng, 12, 9, 3, 3, 3, 2, "cp", 2)
    res = bicluster(W.astype(dtype), 3, 2, method="cp", rank=2, n_iter=2000, tol=0.0, random_state=0)
    assert isinstance(res, BiclusterCPResult) and res.reduce.dtype == dtype
    assert _partition(res.in_groups) == _partition(ig)
    assert _partition(res.out_groups) == _partition(og)
    rel = np.linalg.norm(_rebuild(res) - W) / np.linalg.norm(W)
    assert rel < (1e-4 if dtype == np.float32 else 1e-7)
    assert res.errors[0] == pytest.approx(rel, abs=1e-5 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_svd_recovers_synthetic_bicluster_structure(rng, dtype):
    W, ig, og = _synthetic(rng, 10, 8, 3, 2, 2, 2, "svd", (2, 3))
    res = bicluster(W.astype(dtype), 2, 2, method="svd", ranks=(2, 3), random_state=0)
    assert isinstance(res, BiclusterSVDResult) and res.ranks == (2, 3)
    assert _partition(res.in_groups) == _partition(ig)
    assert _partition(res.out_groups) == _partition(og)
    rel = np.linalg.norm(_rebuild(res) - W) / np.linalg.norm(W)
    assert rel < (1e-5 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("method,kw", [("cp", dict(rank=2)), ("svd", dict(ranks=(2, 4)))])
def test_to_tensor_and_reported_error_match_an_independent_rebuild(rng, method, kw):
    W = rng.standard_normal((8, 6, 3, 2))
    res = bicluster(W, 3, 2, method=method, random_state=1, **kw)
    ref = _rebuild(res)
    np.testing.assert_allclose(res.to_tensor(), ref, rtol=1e-10, atol=1e-12)
    assert res.errors[0] == pytest.approx(np.linalg.norm(W - ref) / np.linalg.norm(W), rel=1e-9)
    assert 0 < res.errors[0] < 1


def test_svd_at_full_ranks_is_exact(rng):
    W = rng.standard_normal((6, 4, 2, 2))
    lim = max_bicluster_ranks((3, 2, 2, 2))
    assert lim["svd"] == (2, 3) and lim["cp"] == 8
    res = bicluster(W, 2, 2, method="svd", ranks=lim["svd"], random_state=0)
    assert res.errors[0] < 1e-12


@pytest.mark.parametrize("method,kw", [("cp", dict(rank=2)), ("svd", dict(ranks=(2, 3)))])
def test_deterministic_for_a_random_state(rng, method, kw):
    W = rng.standard_normal((9, 8, 3, 3)).astype(np.float32)
    a = bicluster(W, 4, 3, method=method, random_state=5, **kw)
    b = bicluster(W, 4, 3, method=method, random_state=5, **kw)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa, fb)


@pytest.mark.parametrize("equal_size", [True, False])
def test_uneven_channel_counts(rng, equal_size):
    W = rng.standard_normal((11, 10, 3, 3))
    res = bicluster(W, 3, 4, method="cp", rank=2, equal_size=equal_size, random_state=0)
    sizes_in, sizes_out = np.diff(res.in_offsets), np.diff(res.out_offsets)
    assert sizes_in.sum() == 10 and sizes_out.sum() == 11 and sizes_in.min() >= 1
    if equal_size:
        assert sorted(sizes_in.tolist()) == [3, 3, 4] and sorted(sizes_out.tolist()) == [2, 3, 3, 3]
    np.testing.assert_array_equal(np.sort(res.in_perm), np.arange(10))
    np.testing.assert_allclose(res.to_tensor(), _rebuild(res), rtol=1e-10, atol=1e-12)
    assert res.in_labels[res.in_groups[1]].tolist() == [1] * sizes_in[1]


def test_cost_matches_the_cost_model_for_equal_groups(rng):
    W = rng.standard_normal((8, 6, 3, 3))
    cp = bicluster(W, 3, 2, method="cp", rank=2, random_state=0)
    sv = bicluster(W, 3, 2, method="svd", ranks=(2, 3), random_state=0)
    for form in ("exact", "paper"):
        for st, pd in ((1, 0), (2, 1)):
            assert cp.cost((6, 11, 11), stride=st, padding=pd, form=form) == cost.bicluster_cp_cost(
                (6, 11, 11), 8, 3, 3, 2, 2, stride=st, padding=pd, form=form)
            assert sv.cost((6, 11, 11), stride=st, padding=pd, form=form) == cost.bicluster_svd_cost(
                (6, 11, 11), 8, 3, 3, 2, (2, 3), stride=st, padding=pd, form=form)
    # a hand count for one case: input 6x7x7, output 5x5 (stride 1), G=3 (C_g=2), H=2 (F_h=4), K=2
    c = cp.cost((6, 7, 7))
    assert c.macs == 3 * 2 * 2 * (49 * 2 + 3 * 5 * 7 + 3 * 25 + 4 * 25)
    assert c.params == cp.n_params() == 6 * 2 * 2 + 2 * (3 * 2 * 2 * 3) + 8 * 3 * 2


def test_channel_groups():
    perm, off = channel_groups(np.array([2, 0, 2, 1, 0]), 3)
    assert perm.tolist() == [1, 4, 3, 0, 2] and off.tolist() == [0, 2, 3, 5]


def test_callback_reports_blocks(rng):
    seen = []
    bicluster(rng.standard_normal((4, 4, 2, 2)), 2, 2, method="svd", ranks=(1, 1), random_state=0,
              callback=seen.append)
    blocks = [(d["g"], d["h"]) for d in seen if d["stage"] == "block"]
    assert sorted(blocks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {d["stage"] for d in seen} >= {"cluster_inputs", "cluster_outputs", "block"}


def test_validation(rng):
    W = rng.standard_normal((8, 6, 3, 3))
    with pytest.raises(ValueError, match="G must be >= 1"):
        bicluster(W, 0, 2, method="cp", rank=1)
    with pytest.raises(ValueError, match="G must be <= 6"):
        bicluster(W, 7, 2, method="cp", rank=1)
    with pytest.raises(ValueError, match="H must be <= 8"):
        bicluster(W, 2, 9, method="cp", rank=1)
    with pytest.raises(TypeError, match="G must be an int"):
        bicluster(W, 2.0, 2, method="cp", rank=1)
    with pytest.raises(ValueError, match="method"):
        bicluster(W, 2, 2, method="tucker", rank=1)
    with pytest.raises(ValueError, match="needs rank"):
        bicluster(W, 2, 2, method="cp")
    with pytest.raises(ValueError, match="ranks"):
        bicluster(W, 2, 2, method="cp", rank=1, ranks=(1, 1))
    with pytest.raises(ValueError, match="needs ranks"):
        bicluster(W, 2, 2, method="svd")
    with pytest.raises(ValueError, match="needs ranks"):
        bicluster(W, 2, 2, method="svd", ranks=(1, 2, 3))
    with pytest.raises(ValueError, match="rank is for method='cp'"):
        bicluster(W, 2, 2, method="svd", rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        bicluster(W, 2, 2, method="cp", rank=0)
    with pytest.raises(ValueError, match="rank must be <= 27"):   # blocks (4, 3, 3, 3): min prod = 27
        bicluster(W, 2, 2, method="cp", rank=28)
    with pytest.raises(ValueError, match=r"K1\) must be <= min\(C/G"):
        bicluster(W, 2, 2, method="svd", ranks=(4, 2))
    with pytest.raises(ValueError, match=r"K2\) must be <= min\(K1\*X\*Y, F/H\) = 4"):
        bicluster(W, 2, 2, method="svd", ranks=(3, 5))
    with pytest.raises(ValueError, match="all zeros"):
        bicluster(np.zeros((4, 4, 3, 3)), 2, 2, method="cp", rank=1)
    bad = W.copy()
    bad[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        bicluster(bad, 2, 2, method="cp", rank=1)
    with pytest.raises(ValueError, match="4 dimensions"):
        bicluster(W[0], 2, 2, method="cp", rank=1)
    with pytest.raises(TypeError, match="dtype"):
        bicluster(W.astype(np.int32), 2, 2, method="cp", rank=1)
    with pytest.raises(TypeError, match="equal_size"):
        bicluster(W, 2, 2, method="cp", rank=1, equal_size="yes")
    with pytest.raises(ValueError, match="cp_algorithm"):
        bicluster(W, 2, 2, method="cp", rank=1, cp_algorithm="hals")


def test_result_types_validate_groups(rng):
    res = bicluster(rng.standard_normal((4, 4, 2, 2)), 2, 2, method="cp", rank=1, random_state=0)
    parts = dict(zip(res.FACTORS, res))
    with pytest.raises(ValueError, match="in_perm must be a permutation"):
        BiclusterCPResult(**dict(parts, in_perm=np.array([0, 0, 1, 2])))
    with pytest.raises(ValueError, match="out_offsets"):
        BiclusterCPResult(**dict(parts, out_offsets=np.array([0, 4, 4])))
    with pytest.raises(ValueError, match="vertical"):
        BiclusterCPResult(**dict(parts, vertical=parts["vertical"][:1]))
    with pytest.raises(ValueError, match="non-finite"):
        BiclusterCPResult(**dict(parts, expand=parts["expand"] * np.nan))


def _dead_inputs(rng):
    """(8, 6, 3, 3) kernel whose input channels 4 and 5 are all zero (dead channels, as pruning leaves them)."""
    W = rng.standard_normal((8, 6, 3, 3))
    W[:, 4:] = 0.0
    return W


@pytest.mark.parametrize("method,kw", [("cp", dict(rank=1)), ("cp", dict(rank=2, cp_algorithm="greedy")),
                                       ("svd", dict(ranks=(1, 1)))])
@pytest.mark.parametrize("data", [False, True])
def test_all_zero_block_gets_zero_factors(rng, method, kw, data):
    W = _dead_inputs(rng)
    cov = np.eye(6 * 9) if data else None
    res = bicluster(W, 3, 2, method=method, random_state=0, data_cov=cov, **kw)
    rebuilt = _rebuild(res)
    zero = [(g, h) for g, ci in enumerate(res.in_groups) for h, fo in enumerate(res.out_groups)
            if not np.any(W[np.ix_(fo, ci)])]
    assert zero, "no all-zero block: the test needs the dead channels grouped together"
    for g, h in zero:
        ci, fo = res.in_groups[g], res.out_groups[h]
        assert not np.any(rebuilt[np.ix_(fo, ci)])               # rebuilt exactly on that block
        assert res.meta["block_errors"][g][h] == 0.0
        if method == "cp":
            i0, i1 = res.in_offsets[g], res.in_offsets[g + 1]
            assert not np.any(res.reduce[i0:i1, h]) and not np.any(res.vertical[g, h])
        else:
            assert not np.any(res.spatial[g, h])
    np.testing.assert_allclose(res.to_tensor(), rebuilt, rtol=1e-10, atol=1e-12)
    assert res.error == pytest.approx(np.linalg.norm(W - rebuilt) / np.linalg.norm(W), rel=1e-9)
    assert res.error < 1.0


def test_duplicate_channels_with_unequal_groups_leave_no_group_empty(rng):
    W = rng.standard_normal((8, 6, 3, 3))
    W[:, 2:] = 0.0                  # four identical (zero) input channels: 3 distinct vectors for G=4 groups
    res = bicluster(W, 4, 2, method="cp", rank=1, equal_size=False, random_state=0)
    assert np.diff(res.in_offsets).min() >= 1 and np.diff(res.in_offsets).sum() == 6
    np.testing.assert_array_equal(np.sort(res.in_perm), np.arange(6))
    np.testing.assert_allclose(res.to_tensor(), _rebuild(res), rtol=1e-10, atol=1e-12)
    again = bicluster(W, 4, 2, method="cp", rank=1, equal_size=False, random_state=0)
    for a, b in zip(res, again):
        np.testing.assert_array_equal(a, b)


def test_svd_ranks_checked_against_the_groups_k_means_found():
    # output channel 0 dominates: plain k-means puts it alone, so an output group has F_h = 1 < F/H = 2
    W = np.random.default_rng(0).standard_normal((4, 4, 1, 1))
    W[0] *= 100.0
    with pytest.raises(ValueError, match=r"ranks\[0\] \(K1\) must be <= min\(C_g, X\*Y\*F_h\) = 1 .*"
                                         r"output groups of 1.*got ranks=\(2, 1\)"):
        bicluster(W, 1, 2, method="svd", ranks=(2, 1), equal_size=False, random_state=0)
    W = np.random.default_rng(0).standard_normal((4, 4, 3, 3))
    W[0] *= 100.0
    with pytest.raises(ValueError, match=r"ranks\[1\] \(K2\) must be <= min\(K1\*X\*Y, F_h\) = 1 .*"
                                         r"output groups of 1.*got ranks=\(1, 2\)"):
        bicluster(W, 1, 2, method="svd", ranks=(1, 2), equal_size=False, random_state=0)
