"""The paper's experiment on a trained network: approximate layers, measure accuracy and wall-clock speed.

Used by the main job (``python -m npconv``); the functions are public so library callers can run their own
sweeps: ``evaluate`` (top-1 and predictions), ``time_layers`` (measured time per layer and per image),
``run_config`` (one approximation plan, measured), ``paired_difference`` (a change of top-1 and its standard
error from paired predictions), ``select`` (the fastest configuration per method within a
top-1 budget, chosen on a validation split).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ._validate import check_int, check_real
from .approximate import approximate
from .network import Network

__all__ = ["evaluate", "paired_difference", "time_layers", "time_interleaved", "Config", "ConfigResult",
           "run_config", "fit_key", "select", "greedy_combine"]


def evaluate(net: Network, X, y, *, batch_size=250, dtype=np.float32, progress=False):
    """Top-1 accuracy of ``net`` on ``(X, y)`` and the predicted classes. ``y`` holds one label per image of ``X``
    (a 1-D array of ``len(X)`` ints)."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"y must be a 1-D array of one label per image of X ({len(X)}), got shape {y.shape}")
    logits = net.predict(X, batch_size=batch_size, dtype=dtype, progress=progress)
    pred = logits.argmax(axis=1)
    return float((pred == y).mean()), pred


def paired_difference(y, pred_before, pred_after):
    """The change of top-1 from ``pred_before`` to ``pred_after`` on the same labelled images, with its standard
    error: ``(delta, se, gained, lost)``.

    ``gained``/``lost`` count the images only the second/first predictions get right. The change is the mean of
    the per-image differences ``d = [after right] - [before right]`` (each -1, 0 or 1), and ``se`` is its
    standard error, ``sqrt(var(d) / n)`` with the sample variance: it comes from the images on which the two
    disagree, so it is much smaller than the standard error of either accuracy on its own (McNemar's setting).
    A change within about two standard errors of the budget is not resolved by this many images.
    """
    y, p0, p1 = np.asarray(y), np.asarray(pred_before), np.asarray(pred_after)
    if not (y.ndim == 1 and p0.shape == p1.shape == y.shape):
        raise ValueError(f"y, pred_before and pred_after must be 1-D of one length, got shapes {y.shape}, "
                         f"{p0.shape} and {p1.shape}")
    n = len(y)
    if n == 0:
        raise ValueError("y must hold at least one image, got 0")
    a = p0 == y
    b = p1 == y
    gained = int(np.sum(b & ~a))
    lost = int(np.sum(a & ~b))
    return (gained - lost) / n, _paired_se(gained, lost, n), gained, lost


def _paired_se(gained, lost, n):
    """Standard error of the mean of n per-image differences, ``gained`` of them +1 and ``lost`` -1."""
    if n < 2:
        return 0.0
    delta = (gained - lost) / n
    return float(np.sqrt(max((gained + lost - n * delta * delta) / (n - 1), 0.0) / n))


def time_layers(net: Network, x, *, repeat=5, warmup=1):
    """Median seconds per layer on the batch ``x`` and for the whole forward pass (sum of the layers)."""
    rows = net.profile(x, repeat=repeat, warmup=warmup, print_fn=None)
    per_layer = {r["name"]: r["seconds"] for r in rows}
    return per_layer, sum(per_layer.values())


def time_interleaved(nets, x, *, repeat=5, warmup=1, rounds=False):
    """``time_layers`` of several networks on the batch ``x``, one run of each in turn, ``repeat`` rounds: on a
    machine whose speed drifts (a shared host), every network is measured in the same conditions. Returns one
    ``(per_layer, total)`` per network (medians over the rounds); with ``rounds=True``, also the rounds themselves:
    ``(that list, [[{layer: seconds} per round] per network])``, for ratios taken round by round."""
    repeat = check_int(repeat, "repeat", min_value=1)
    warmup = check_int(warmup, "warmup", min_value=0)
    nets = list(nets)
    if not nets:
        raise ValueError("nets must hold at least one network, got none")
    for net in nets:
        net.profile(x, repeat=1, warmup=warmup, print_fn=None)
    runs = [[] for _ in nets]
    for _ in range(repeat):
        for i, net in enumerate(nets):
            runs[i].append({r["name"]: r["seconds"] for r in net.profile(x, repeat=1, warmup=0, print_fn=None)})
    out = []
    for net, rs in zip(nets, runs):
        per_layer = {n: float(np.median([r[n] for r in rs])) for n in net.names}
        out.append((per_layer, sum(per_layer.values())))
    return (out, runs) if rounds else out


@dataclass(frozen=True)
class Config:
    """One named approximation plan: ``{layer: spec}`` plus the method family it belongs to."""
    family: str
    plan: dict

    @property
    def label(self):
        return "; ".join(f"{k}: {v.describe()}" for k, v in self.plan.items())


@dataclass
class ConfigResult:
    config: Config
    reports: list
    top1: float
    agreement: float
    seconds_layers_before: float
    seconds_layers_after: float
    seconds_net_before: float
    seconds_net_after: float
    batch: int
    split: str
    extra: dict = field(default_factory=dict)
    #: the images only the approximated / only the exact network gets right, and the number of images
    gained: Optional[int] = None
    lost: Optional[int] = None
    n_images: Optional[int] = None

    @property
    def delta_top1_se(self):
        """The standard error of the change of top-1 (``paired_difference``), or None without the counts."""
        return None if self.n_images is None else _paired_se(self.gained, self.lost, self.n_images)

    #: speedups as medians of the ratios of the same round (``time_interleaved(..., rounds=True)``), when timed so
    paired_layer_speedup: Optional[float] = None
    paired_net_speedup: Optional[float] = None

    @property
    def layer_speedup(self):
        """Measured speedup of the plan's layers: the median of the per-round ratios when the exact network was
        timed interleaved (robust to a change of the host's speed between rounds), else the ratio of the medians."""
        if self.paired_layer_speedup is not None:
            return self.paired_layer_speedup
        return self.seconds_layers_before / self.seconds_layers_after

    @property
    def net_speedup(self):
        """As :attr:`layer_speedup`, for the whole network."""
        if self.paired_net_speedup is not None:
            return self.paired_net_speedup
        return self.seconds_net_before / self.seconds_net_after

    @property
    def approximated(self):
        """The reports of the plan's layers (without those of layers refitted above them)."""
        return [r for r in self.reports if r.layer in self.config.plan]

    @property
    def theoretical_gain(self):
        before = sum(r.macs_before for r in self.approximated)
        after = sum(r.macs_after for r in self.approximated)
        return before / after if after else float("inf")

    @property
    def params_before(self):
        return sum(r.params_before for r in self.approximated)

    @property
    def params_after(self):
        return sum(r.params_after for r in self.approximated)

    def as_dict(self, baseline_top1=None):
        d = dict(family=self.config.family, config=self.config.label, split=self.split, top1=self.top1,
                 settings={k: {**v.settings(), "method": v.method} for k, v in self.config.plan.items()},
                 agreement=self.agreement, theoretical_gain=self.theoretical_gain, layer_speedup=self.layer_speedup,
                 net_speedup=self.net_speedup, params_before=self.params_before, params_after=self.params_after,
                 ms_per_image_layers_before=1e3 * self.seconds_layers_before / self.batch,
                 ms_per_image_layers_after=1e3 * self.seconds_layers_after / self.batch,
                 ms_per_image_net_before=1e3 * self.seconds_net_before / self.batch,
                 ms_per_image_net_after=1e3 * self.seconds_net_after / self.batch,
                 layers=[r.as_dict() for r in self.reports], **self.extra)
        if baseline_top1 is not None:
            d["delta_top1"] = self.top1 - baseline_top1
        if self.n_images is not None:
            d.update(gained=self.gained, lost=self.lost, n_images=self.n_images, delta_top1_se=self.delta_top1_se)
        return d


def run_config(net, config, X, y, *, base_pred, base_times, timing_batch, data=None, repeat=5,
               device=None, dtype=np.float32, refit=False, base_net=None, fits=None):
    """Approximate ``net`` with ``config``, then measure top-1, agreement with ``base_pred`` (the exact
    network's predictions on ``X``), the images gained and lost against it (``ConfigResult.delta_top1_se``) and
    time.

    ``base_times`` is ``time_layers(net, timing_batch)`` measured once for the exact network (on the same
    device); with ``base_net`` (the exact network, on that device) the exact network is timed again, interleaved
    with the approximated one (``time_interleaved``), the speedups are the medians of the per-round ratios, and
    ``base_times`` is not used. ``data``: network inputs
    for specs with ``fit="data"``. ``device``: a function moving a network to where ``timing_batch`` lives (e.g.
    ``Network.to_gpu``); the approximation itself runs on the CPU.
    ``refit``: approximate sequentially and refit the dense layers above (``approximate``'s ``sequential`` and
    ``refit_above``; needs ``data``). The result's gain, parameters and layer times count the plan's layers.
    ``fits``: a dict the caller keeps across calls (e.g. ``{}``), in which each fit is stored under its plan, its
    fitting options and the identities of ``net`` and ``data`` (:func:`fit_key`); a plan fitted before is taken
    from it instead of being fitted again (with each spec's ``random_state`` set, as by default, a new fit would be
    the same). The main job scores its chosen plans on the test split this way, with the networks it fitted for the
    validation sweep. The result's ``extra`` says ``fit_reused`` and keeps the first fit's ``fit_seconds``.
    """
    if fits is not None and not isinstance(fits, dict):
        raise TypeError(f"fits must be a dict (a cache the caller keeps) or None, got {type(fits).__name__}")
    needs_data = _needs_data(config.plan, refit)
    key = fit_key(net, config.plan, data, refit) if fits is not None else None
    if key is not None and key in fits:
        approx, reports, fit_s = fits[key][:3]
        reused = True
    else:
        t0 = time.perf_counter()
        approx, reports = approximate(net, config.plan, data=data if needs_data else None, sequential=bool(refit),
                                      refit_above=bool(refit), return_report=True)
        fit_s = time.perf_counter() - t0
        reused = False
        if key is not None:   # net and data kept alive with the fit, so that their ids stay theirs
            fits[key] = (approx, reports, fit_s, net, data)
    if device is not None:
        approx = device(approx)
    top1, pred = evaluate(approx, X, y, dtype=dtype)
    names = list(config.plan)
    paired = {}
    if base_net is not None:
        ((per_before, net_before), (per_after, net_after)), (rb, ra) = time_interleaved(
            [base_net, approx], timing_batch, repeat=repeat, rounds=True)
        paired = dict(
            paired_layer_speedup=float(np.median([sum(b[n] for n in names) / sum(a[n] for n in names)
                                                  for b, a in zip(rb, ra)])),
            paired_net_speedup=float(np.median([sum(b.values()) / sum(a.values()) for b, a in zip(rb, ra)])))
    else:
        per_before, net_before = base_times
        per_after, net_after = time_layers(approx, timing_batch, repeat=repeat)
    _, _, gained, lost = paired_difference(y, base_pred, pred)
    return ConfigResult(config=config, reports=reports, top1=top1, agreement=float((pred == base_pred).mean()),
                        seconds_layers_before=sum(per_before[n] for n in names),
                        seconds_layers_after=sum(per_after[n] for n in names),
                        seconds_net_before=net_before, seconds_net_after=net_after,
                        batch=len(timing_batch), split="", extra=dict(fit_seconds=fit_s, fit_reused=reused),
                        gained=gained, lost=lost,
                        n_images=len(pred), **paired)


def _needs_data(plan, refit):
    """Whether fitting ``plan`` uses the data: for a refit, or for a spec fitted in the data metric."""
    return bool(refit) or any(getattr(s, "fit", "weights") == "data" for s in plan.values())


def fit_key(net, plan, data=None, refit=False):
    """The key under which ``run_config(net, Config(..., plan), ..., data=data, refit=refit, fits=fits)`` keeps its
    fit in ``fits``, or None for a plan whose specs are not hashable (such a fit is not kept). The network and the
    data are keyed by identity (the cache serves one sweep over the same objects); the data only where the fit
    uses it."""
    try:
        return (id(net), id(data) if _needs_data(plan, refit) else None, bool(refit), frozenset(plan.items()))
    except TypeError:
        return None


def select(results, baseline_top1, *, budget=0.01, margin=0.0):
    """Per family, the configuration with the largest measured layer speedup whose top-1 drop is within
    ``budget`` (a finite fraction >= 0, 0.01 = 1 point); a family with none within budget gives its most accurate
    one.

    ``margin`` (>= 0, in standard errors): a configuration is within budget when its drop plus ``margin`` times
    the standard error of its change (``ConfigResult.delta_top1_se``) is; 0 (the paper's protocol) compares the
    drop alone. With ``margin=1`` or 2 a choice at the edge of the budget on the selection split is less likely to
    exceed it on another split."""
    budget = _check_budget(budget)
    margin = _check_margin(margin)
    best = {}
    for r in results:
        ok = _within(r, baseline_top1, budget, margin)
        key = (ok, r.layer_speedup if ok else r.top1)
        cur = best.get(r.config.family)
        if cur is None or key > cur[0]:
            best[r.config.family] = (key, r)
    return {fam: v[1] for fam, v in best.items()}


def _check_margin(margin):
    return check_real(margin, "margin", min_value=0.0)


def _check_budget(budget):
    """A top-1 budget: a finite fraction >= 0 (0.01 = 1 point)."""
    return check_real(budget, "budget", min_value=0.0)


def _within(r, baseline_top1, budget, margin=0.0):
    drop = baseline_top1 - r.top1
    if margin:
        se = r.delta_top1_se
        if se is None:
            raise ValueError(f"margin={margin} needs the standard error of each result's change of top-1 "
                             f"(run_config records it), got a result without it ({r.config.label})")
        drop += margin * se
    return drop <= budget + 1e-9   # a drop of exactly the budget is within it


def greedy_combine(results, baseline_top1, evaluate_config, *, family="combined", budget=0.01, max_steps=4,
                   margin=0.0):
    """Combine one setting per layer group into a single plan that stays within the top-1 budget, greedily.

    The within-budget validation ``results`` are grouped by the layers they replace (two methods for the same
    layer compete for it). Starting from the fastest setting of every group, the combination is evaluated with
    ``evaluate_config(Config) -> ConfigResult``; while it loses more than ``budget``, the group whose current
    setting loses most moves to its next more accurate setting, or is left out when it has none. Returns the
    evaluated ConfigResults; the last one is the answer when it is within budget. ``margin``: as in
    :func:`select`, for the settings and the combinations alike.
    """
    budget = _check_budget(budget)
    margin = _check_margin(margin)
    options = {}
    for r in results:
        if _within(r, baseline_top1, budget, margin):
            options.setdefault(tuple(sorted(r.config.plan)), []).append(r)
    for key in options:
        options[key].sort(key=lambda r: -r.layer_speedup)
    choice = {key: 0 for key in options}
    tried = []
    for _ in range(max_steps):
        if len(choice) < 2:
            break
        plan = {}
        for key, i in choice.items():
            plan.update(options[key][i].config.plan)
        r = evaluate_config(Config(family, plan))
        tried.append(r)
        if _within(r, baseline_top1, budget, margin):
            break
        worst = max(choice, key=lambda k: baseline_top1 - options[k][choice[k]].top1)
        nxt = choice[worst] + 1
        if nxt < len(options[worst]) and options[worst][nxt].top1 > options[worst][choice[worst]].top1:
            choice[worst] = nxt
        else:
            del choice[worst]
    return tried
