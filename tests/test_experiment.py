"""The experiment helpers: networks timed in turn (``time_interleaved``), the paired change of top-1
(``paired_difference``) against per-image differences counted here."""
import numpy as np
import pytest

from npconv import Network
from npconv.experiment import paired_difference, time_interleaved
from npconv.layers import Linear, ReLU


def _net(rng):
    return Network([("fc", Linear(rng.standard_normal((4, 6)))), ("relu", ReLU())], input_shape=(6,))


def test_time_interleaved_alternates_and_takes_medians(rng, monkeypatch):
    a, b = _net(rng), _net(rng)
    calls = []
    fake = {id(a): iter([0.5, 1.0, 3.0, 2.0, 9.0, 5.0]), id(b): iter([7.0, 4.0, 1.0, 6.0, 8.0, 2.0])}

    def profile_of(net):
        def profile(x, *, repeat, warmup, print_fn):
            assert repeat == 1 and print_fn is None
            calls.append(("a" if net is a else "b", warmup))
            if warmup:
                return []
            return [dict(name=n, seconds=next(fake[id(net)])) for n in net.names]
        return profile

    monkeypatch.setattr(a, "profile", profile_of(a))
    monkeypatch.setattr(b, "profile", profile_of(b))
    (pa, ta), (pb, tb) = time_interleaved([a, b], np.zeros((2, 6)), repeat=3, warmup=1)
    assert calls == [("a", 1), ("b", 1)] + [("a", 0), ("b", 0)] * 3
    # medians per layer over the three rounds: a's fc times 0.5, 3.0, 9.0 and relu 1.0, 2.0, 5.0
    assert pa == {"fc": 3.0, "relu": 2.0} and ta == 5.0
    assert pb == {"fc": 7.0, "relu": 4.0} and tb == 11.0


@pytest.mark.parametrize("kw, err, words", [
    (dict(repeat=0), ValueError, "repeat must be >= 1, got 0"),
    (dict(repeat=-3), ValueError, "repeat must be >= 1"),
    (dict(repeat=1.5), TypeError, "repeat must be an int"),
    (dict(warmup=-1), ValueError, "warmup must be >= 0"),
    (dict(warmup=None), TypeError, "warmup must be an int"),
])
def test_time_interleaved_validates_repeat_and_warmup(rng, kw, err, words):
    with pytest.raises(err, match=words):
        time_interleaved([_net(rng)], np.zeros((2, 6)), **kw)
    with pytest.raises(ValueError, match="nets must hold at least one network"):
        time_interleaved([], np.zeros((2, 6)))


def test_evaluate_checks_the_label_count(rng):
    from npconv.experiment import evaluate
    net = _net(rng)
    X = rng.standard_normal((4, 6))
    for y in (np.array([0]), np.zeros(5, int), np.zeros((4, 1), int)):
        with pytest.raises(ValueError, match=r"y must be a 1-D array of one label per image of X \(4\)"):
            evaluate(net, X, y)
    pred = net.forward(X).argmax(axis=1)          # the reference: the network's own argmax
    top1, got = evaluate(net, X, pred)
    assert top1 == 1.0 and got.tolist() == pred.tolist()


def test_paired_difference_against_hand_counts_and_the_sample_variance(rng):
    y = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    before = np.array([0, 1, 2, 3, 0, 0, 6, 0])       # right on 0, 1, 2, 3, 6
    after = np.array([0, 1, 9, 9, 4, 0, 6, 7])        # right on 0, 1, 4, 6, 7: gains 4 and 7, loses 2 and 3
    delta, se, gained, lost = paired_difference(y, before, after)
    assert (gained, lost) == (2, 2) and delta == 0.0
    d = np.array([0, 0, -1, -1, 1, 0, 0, 1], float)
    assert se == pytest.approx(np.std(d, ddof=1) / np.sqrt(8), rel=1e-12)
    # random predictions: the closed form against the per-image differences
    y = rng.integers(0, 10, 5000)
    before = np.where(rng.random(5000) < 0.85, y, rng.integers(0, 10, 5000))
    after = np.where(rng.random(5000) < 0.9, before, rng.integers(0, 10, 5000))
    delta, se, gained, lost = paired_difference(y, before, after)
    d = (after == y).astype(float) - (before == y)
    assert delta == pytest.approx(d.mean(), abs=1e-15)
    assert se == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), rel=1e-12)
    assert gained == int(np.sum(d > 0)) and lost == int(np.sum(d < 0))
    # identical predictions: no change and no uncertainty
    assert paired_difference(y, before, before)[:2] == (0.0, 0.0)


def test_paired_difference_validation():
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        paired_difference(np.zeros(3), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least one image"):
        paired_difference(np.zeros(0), np.zeros(0), np.zeros(0))


def test_run_config_reports_gains_losses_and_their_standard_error(rng):
    """The counts against the exact network's predictions, recomputed here from the two networks' outputs."""
    from npconv.approximate import SVD, approximate
    from npconv.experiment import Config, evaluate, run_config, time_layers

    net = Network([("fc1", Linear(rng.standard_normal((16, 12)))), ("relu", ReLU()),
                   ("fc2", Linear(rng.standard_normal((5, 16))))], input_shape=(12,))
    X = rng.standard_normal((400, 12))
    y = rng.integers(0, 5, 400)
    _, base_pred = evaluate(net, X, y)
    xb = X[:8].astype(np.float32)
    cfg = Config("svd", {"fc1": SVD(rank=2)})
    r = run_config(net, cfg, X, y, base_pred=base_pred, base_times=time_layers(net, xb, repeat=1),
                   timing_batch=xb, repeat=1)
    pred = evaluate(approximate(net, cfg.plan), X, y)[1]
    a, b = base_pred == y, pred == y
    assert (r.gained, r.lost, r.n_images) == (int(np.sum(b & ~a)), int(np.sum(a & ~b)), 400)
    assert r.lost + r.gained > 0                      # rank 2 of 12 changes some predictions
    d = b.astype(float) - a
    assert r.delta_top1_se == pytest.approx(d.std(ddof=1) / np.sqrt(400), rel=1e-12)
    out = r.as_dict(float(a.mean()))
    assert out["delta_top1"] == pytest.approx(d.mean(), abs=1e-12) and out["delta_top1_se"] == r.delta_top1_se


def _result(family, label_rank, top1, speedup, gained, lost, n=10000):
    """A ConfigResult with the given top-1, layer speedup and paired counts (nothing else measured)."""
    from npconv.approximate import SVD
    from npconv.experiment import Config, ConfigResult
    return ConfigResult(config=Config(family, {"fc": SVD(rank=label_rank)}), reports=[], top1=top1, agreement=0.9,
                        seconds_layers_before=speedup, seconds_layers_after=1.0, seconds_net_before=1.0,
                        seconds_net_after=1.0, batch=1, split="val", gained=gained, lost=lost, n_images=n)


def test_select_with_a_margin_of_standard_errors():
    """Base top-1 80% on 10,000 images: the faster setting drops 0.9 points (se 0.0996 points), the slower 0.3."""
    from npconv.experiment import select
    edge = _result("svd", 2, 0.791, 5.0, gained=5, lost=95)
    safe = _result("svd", 4, 0.797, 3.0, gained=0, lost=30)
    assert edge.delta_top1_se == pytest.approx(np.sqrt((100 - 10000 * 0.009 ** 2) / 9999 / 10000), rel=1e-12)
    assert select([edge, safe], 0.80, budget=0.01)["svd"] is edge    # the paper's rule: the drop alone
    assert select([edge, safe], 0.80, budget=0.01, margin=1.5)["svd"] is safe     # 0.9 + 0.149 > 1 point
    assert select([edge, safe], 0.80, budget=0.01, margin=0.5)["svd"] is edge     # 0.9 + 0.050 < 1 point
    with pytest.raises(ValueError, match="margin must be"):
        select([edge], 0.80, margin=-1.0)
    bare = _result("svd", 2, 0.791, 5.0, gained=None, lost=None, n=None)
    with pytest.raises(ValueError, match="needs the standard error"):
        select([bare], 0.80, margin=1.0)


@pytest.mark.parametrize("budget, err", [(float("nan"), ValueError), (float("inf"), ValueError), (-0.01, ValueError),
                                         ("1", TypeError), (None, TypeError)])
def test_select_and_greedy_combine_validate_the_budget(budget, err):
    from npconv.experiment import greedy_combine, select
    r = _result("svd", 2, 0.791, 5.0, gained=5, lost=95)
    with pytest.raises(err, match="budget must be"):
        select([r], 0.80, budget=budget)
    with pytest.raises(err, match="budget must be"):
        greedy_combine([r], 0.80, lambda cfg: r, budget=budget)


def _layer_result(layer, rank, top1, speedup, lost=0):
    from npconv.approximate import SVD
    from npconv.experiment import Config, ConfigResult
    return ConfigResult(config=Config(layer, {layer: SVD(rank=rank)}), reports=[], top1=top1, agreement=0.9,
                        seconds_layers_before=speedup, seconds_layers_after=1.0, seconds_net_before=1.0,
                        seconds_net_after=1.0, batch=1, split="val", gained=0, lost=lost, n_images=10000)


def test_greedy_combine_backs_off_the_layer_that_loses_most():
    """Two layers, two settings each; a combination loses the sum of its settings' drops (a model of the network
    written here). Base 0.80, budget 1 point."""
    from npconv.experiment import ConfigResult, greedy_combine
    a_fast, a_slow = _layer_result("a", 2, 0.794, 6.0, 60), _layer_result("a", 4, 0.798, 3.0, 20)
    b_fast, b_slow = _layer_result("b", 2, 0.797, 5.0, 30), _layer_result("b", 4, 0.799, 2.0, 10)
    drop = {("a", 2): 0.006, ("a", 4): 0.002, ("b", 2): 0.003, ("b", 4): 0.001}
    seen = []

    def evaluate_config(cfg):
        seen.append({k: v.rank for k, v in cfg.plan.items()})
        d = sum(drop[(k, v.rank)] for k, v in cfg.plan.items())
        return ConfigResult(config=cfg, reports=[], top1=0.80 - d, agreement=0.9, seconds_layers_before=1.0,
                            seconds_layers_after=1.0, seconds_net_before=1.0, seconds_net_after=1.0, batch=1,
                            split="val", gained=0, lost=int(round(d * 10000)), n_images=10000)

    tried = greedy_combine([a_fast, a_slow, b_fast, b_slow], 0.80, evaluate_config, budget=0.01)
    # fastest of each (0.6 + 0.3 = 0.9 points): within budget at once
    assert seen == [{"a": 2, "b": 2}] and tried[-1].top1 == pytest.approx(0.791)
    seen.clear()
    tried = greedy_combine([a_fast, a_slow, b_fast, b_slow], 0.80, evaluate_config, budget=0.008)
    # 0.9 points > 0.8: layer a (0.6 of it) moves to its slower setting: 0.2 + 0.3 = 0.5 points
    assert seen == [{"a": 2, "b": 2}, {"a": 4, "b": 2}] and tried[-1].top1 == pytest.approx(0.795)
    seen.clear()
    # with a margin of 2 standard errors the 0.9-point combination (se 0.094 points) is over the 1-point budget
    tried = greedy_combine([a_fast, a_slow, b_fast, b_slow], 0.80, evaluate_config, budget=0.01, margin=2.0)
    assert seen == [{"a": 2, "b": 2}, {"a": 4, "b": 2}]


def test_speedups_are_medians_of_per_round_ratios(rng, monkeypatch):
    """With the exact network timed beside the approximated one, each round's ratio is taken before the median:
    a round in which the host ran slow for both networks does not skew the speedup (scripted rounds: fc1 takes
    2, 20, 3 against 1, 10, 1; the ratio of the medians is 3 / 1, the per-round ratios 2, 2, 3 have median 2)."""
    from npconv.approximate import SVD
    from npconv.experiment import Config, evaluate, run_config

    net = Network([("fc1", Linear(rng.standard_normal((16, 12)))), ("relu", ReLU()),
                   ("fc2", Linear(rng.standard_normal((5, 16))))], input_shape=(12,))
    X = rng.standard_normal((50, 12))
    y = rng.integers(0, 5, 50)
    _, base_pred = evaluate(net, X, y)
    rounds_before = [{"fc1": 2.0, "relu": 1.0, "fc2": 1.0}, {"fc1": 20.0, "relu": 1.0, "fc2": 1.0},
                     {"fc1": 3.0, "relu": 1.0, "fc2": 1.0}]
    rounds_after = [{"fc1": 1.0, "relu": 1.0, "fc2": 1.0}, {"fc1": 10.0, "relu": 1.0, "fc2": 1.0},
                    {"fc1": 1.0, "relu": 1.0, "fc2": 1.0}]

    def fake(nets, x, *, repeat, rounds):
        assert len(nets) == 2 and rounds
        meds = [({k: float(np.median([r[k] for r in rs])) for k in rs[0]}, 0.0) for rs in (rounds_before,
                                                                                          rounds_after)]
        return [(p, sum(p.values())) for p, _ in meds], [rounds_before, rounds_after]

    import npconv.experiment as E
    monkeypatch.setattr(E, "time_interleaved", fake)
    r = run_config(net, Config("svd", {"fc1": SVD(rank=2)}), X, y, base_pred=base_pred, base_times=None,
                   timing_batch=X[:4], repeat=3, base_net=net)
    assert r.layer_speedup == pytest.approx(2.0)                 # median of 2, 2, 3
    assert r.seconds_layers_before / r.seconds_layers_after == pytest.approx(3.0)   # the medians' ratio
    # whole network: per-round totals 4/3, 22/12, 5/3 -> median 5/3
    assert r.net_speedup == pytest.approx(5 / 3)
    assert r.as_dict()["layer_speedup"] == pytest.approx(2.0)


def test_run_config_reuses_a_fit_from_its_cache(rng, monkeypatch):
    """``fits``: a plan fitted once is taken from the cache for the next split (one call of ``approximate``), with
    the same network; another plan, other data or another refit setting is fitted anew."""
    from npconv.approximate import SVD
    import npconv.experiment as E

    net = Network([("fc1", Linear(rng.standard_normal((16, 12)))), ("relu", ReLU()),
                   ("fc2", Linear(rng.standard_normal((5, 16))))], input_shape=(12,))
    X = rng.standard_normal((60, 12))
    y = rng.integers(0, 5, 60)
    _, base_pred = E.evaluate(net, X, y)
    xb = X[:4].astype(np.float32)
    times = E.time_layers(net, xb, repeat=1)
    fitted = []
    real = E.approximate

    def counting(n, plan, **kw):
        out = real(n, plan, **kw)
        fitted.append((dict(plan), kw["data"], out[0]))
        return out

    monkeypatch.setattr(E, "approximate", counting)
    fits = {}

    def run(cfg, Xs, ys, data=None, refit=False):
        return E.run_config(net, cfg, Xs, ys, base_pred=E.evaluate(net, Xs, ys)[1], base_times=times,
                            timing_batch=xb, repeat=1, data=data, refit=refit, fits=fits)

    cal = rng.standard_normal((40, 12))
    a = E.Config("svd", {"fc1": SVD(rank=2, fit="data")})
    r1 = run(a, X, y, data=cal)
    r2 = run(E.Config("svd, same plan", {"fc1": SVD(rank=2, fit="data")}), X[::-1], y[::-1], data=cal)
    assert len(fitted) == 1 and not r1.extra["fit_reused"] and r2.extra["fit_reused"]
    assert r2.extra["fit_seconds"] == r1.extra["fit_seconds"]
    assert r2.top1 == r1.top1 and r2.agreement == r1.agreement   # the same network, on the same images reversed
    assert len(fits) == 1 and next(iter(fits.values()))[0] is fitted[0][2]
    assert E.fit_key(net, a.plan, cal) in fits
    run(E.Config("svd", {"fc1": SVD(rank=3, fit="data")}), X, y, data=cal)      # another plan
    run(a, X, y, data=cal.copy())                                                 # equal data, another array
    run(a, X, y, data=cal, refit=True)                                            # refitting above
    assert len(fitted) == 4 and len(fits) == 4
    b = E.Config("svd", {"fc1": SVD(rank=2)})              # fitted on the weights: the data is not part of the key
    run(b, X, y, data=cal)
    run(b, X, y, data=cal.copy())
    assert len(fitted) == 5 and E.fit_key(net, b.plan, cal) == E.fit_key(net, b.plan, None)
    assert E.fit_key(net, {"fc1": SVD(rank=2)}, None) != E.fit_key(_net(rng), {"fc1": SVD(rank=2)}, None)
    with pytest.raises(TypeError, match="fits must be a dict .* got list"):
        E.run_config(net, a, X, y, base_pred=base_pred, base_times=times, timing_batch=xb, data=cal, fits=[])


def test_fit_key_of_an_unhashable_plan_is_none(rng):
    from npconv.experiment import fit_key

    class Unhashable:
        fit = "weights"
        __hash__ = None

    assert fit_key(_net(rng), {"fc": Unhashable()}) is None
