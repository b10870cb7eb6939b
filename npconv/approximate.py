"""``approximate(net, plan)``: a new network whose chosen layers are replaced by factored layers.

A plan maps layer names to specs::

    net2 = npconv.approximate(net, {"conv1": Monochromatic(colors=6),
                                     "conv2": Bicluster(G=4, H=2, rank=8, method="cp"),
                                     "fc5": SVD(rank=64)})

The original network is untouched. Each spec is a small frozen description of one approximation; it validates
its settings when built, checks that it fits the layer it is applied to, runs the decomposition (from
``npconv.decompose``) and returns the factored layer that EXECUTES the factors. With ``data`` (a sample of
network inputs), specs with ``fit="data"`` fit in the data metric (weighted by the covariance of the layer's
input patches, collected by a forward pass), and the report gives each layer's output error on that data.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from ._validate import check_int, check_option, check_real
from .decompose._linalg import solve_psd
from .layers.dense import Conv2d, Linear
from .network import Network

__all__ = ["approximate", "Spec", "SVD", "Monochromatic", "Bicluster", "Separable", "SharedSeparable",
           "ApproximationReport"]

_FITS = ("weights", "data")


@dataclass(frozen=True)
class Spec:
    """Base class of the approximation specs."""
    #: the layer classes a spec applies to
    applies_to = ()

    def __post_init__(self):
        self._check()

    def _check(self):
        pass

    @property
    def method(self) -> str:
        return type(self).__name__

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        s = ", ".join(f"{k}={v}" for k, v in self.settings().items() if k not in ("random_state", "fit") and
                      v is not None)
        return f"{self.method}({s})"

    def check_layer(self, name, layer):
        if not isinstance(layer, self.applies_to):
            kinds = " or ".join(c.__name__ for c in self.applies_to)
            raise TypeError(f"plan[{name!r}]: {self.method} applies to {kinds} layers, "
                            f"got {type(layer).__name__}")
        if isinstance(layer, Conv2d) and layer.groups != 1:
            raise ValueError(f"plan[{name!r}]: {self.method} needs an ungrouped convolution, got groups={layer.groups}")
        if isinstance(layer, Conv2d) and layer.dilation != (1, 1):
            raise ValueError(f"plan[{name!r}]: {self.method} needs dilation 1, got {layer.dilation}")

    def decompose(self, layer, data_cov):
        raise NotImplementedError

    def build(self, layer, result):
        kw = {} if isinstance(layer, Linear) else dict(stride=layer.stride, padding=layer.padding)
        return result.to_layer(bias=None if layer.bias is None else np.array(layer.bias), **kw)


def _check_fit(fit):
    check_option(fit, "fit", _FITS)


def _rank_ok(rank, name="rank"):
    # the types npconv.decompose.svd.resolve_rank accepts: any integral or real number (NumPy scalars too), no bool
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Real):
        raise TypeError(f"{name} must be an int or a float in (0, 1], got {type(rank).__name__} ({rank!r})")
    if isinstance(rank, numbers.Integral):
        return check_int(rank, name, min_value=1)
    if not 0 < float(rank) <= 1:
        raise ValueError(f"{name} as a fraction of parameters kept must be in (0, 1], got {rank}")
    return rank


@dataclass(frozen=True)
class SVD(Spec):
    """Truncated SVD (§3.1): a dense layer as two dense layers; a conv as a rank-t conv then a 1x1 conv.

    ``rank``: an int, or a float in (0, 1] giving the fraction of the parameters kept.
    """
    rank: Union[int, float] = 0.25
    fit: str = "weights"
    applies_to = (Linear, Conv2d)

    def _check(self):
        _rank_ok(self.rank)
        _check_fit(self.fit)

    def decompose(self, layer, data_cov):
        from .decompose import svd
        W = np.array(layer.weight)
        if isinstance(layer, Linear):
            return svd.svd_lowrank(W, self.rank, data_cov=data_cov)
        return svd.conv_svd(W, self.rank, data_cov=data_cov)


@dataclass(frozen=True)
class Monochromatic(Spec):
    """Monochromatic first layer (§4.1): C' shared colours, one single-channel spatial filter per output."""
    colors: int = 6
    equal_size: bool = True
    fit: str = "weights"
    random_state: Optional[int] = 0
    applies_to = (Conv2d,)

    def _check(self):
        check_int(self.colors, "colors", min_value=1)
        _check_fit(self.fit)

    def decompose(self, layer, data_cov):
        from .decompose.monochromatic import monochromatic
        return monochromatic(np.array(layer.weight), self.colors, equal_size=self.equal_size,
                             random_state=self.random_state, data_cov=data_cov)


@dataclass(frozen=True)
class Bicluster(Spec):
    """Biclustering (§4.4): G input x H output channel groups, each block by CP (``rank``) or SVD (``ranks``).

    ``fit="data"``: the blocks are refitted in the data metric of the layer's input patches (the groups stay
    those clustered on the weights; ``npconv.decompose.bicluster``'s ``data_cov``).
    """
    G: int = 2
    H: int = 2
    rank: Optional[int] = None
    ranks: Optional[Tuple[int, int]] = None
    method: str = "cp"
    equal_size: bool = True
    random_state: Optional[int] = 0
    fit: str = "weights"
    applies_to = (Conv2d,)

    def _check(self):
        check_int(self.G, "G", min_value=1)
        check_int(self.H, "H", min_value=1)
        check_option(self.method, "method", ("cp", "svd"))
        # the same rules as npconv.decompose.bicluster.bicluster, checked when the spec is built
        if self.method == "cp":
            if self.ranks is not None:
                raise ValueError(f"ranks (K1, K2) is for method='svd'; method='cp' takes rank=K, got "
                                 f"ranks={self.ranks!r}")
            if self.rank is None:
                raise ValueError("rank must be given for method='cp'")
            check_int(self.rank, "rank", min_value=1)
        else:
            if self.rank is not None:
                raise ValueError(f"rank is for method='cp'; method='svd' takes ranks=(K1, K2), got rank={self.rank!r}")
            if not isinstance(self.ranks, (tuple, list)) or len(self.ranks) != 2:
                raise ValueError(f"ranks must be a pair (K1, K2) of ints for method='svd', got {self.ranks!r}")
            check_int(self.ranks[0], "ranks[0] (K1)", min_value=1)
            check_int(self.ranks[1], "ranks[1] (K2)", min_value=1)
        _check_fit(self.fit)

    @property
    def method_name(self):
        return f"Bicluster-{self.method.upper()}"

    def describe(self):
        r = f"K={self.rank}" if self.method == "cp" else f"K1={self.ranks[0]}, K2={self.ranks[1]}"
        return f"Bicluster-{self.method.upper()}(G={self.G}, H={self.H}, {r})"

    def decompose(self, layer, data_cov):
        from .decompose.bicluster import bicluster
        kw = dict(rank=self.rank) if self.method == "cp" else dict(ranks=tuple(self.ranks))
        return bicluster(np.array(layer.weight), self.G, self.H, method=self.method, equal_size=self.equal_size,
                         random_state=self.random_state, data_cov=data_cov, **kw)


@dataclass(frozen=True)
class Separable(Spec):
    """Spatially separable filters (Jaderberg et al. 2014, scheme 2): K vertical then F horizontal filters."""
    rank: int = 16
    fit: str = "weights"
    applies_to = (Conv2d,)

    def _check(self):
        check_int(self.rank, "rank", min_value=1)
        _check_fit(self.fit)

    def decompose(self, layer, data_cov):
        from .decompose.separable import separable
        return separable(np.array(layer.weight), self.rank, data_cov=data_cov)


@dataclass(frozen=True)
class SharedSeparable(Spec):
    """Bicluster-CP blocks whose rank-1 spatial filters share a k-means codebook (the paper's eq. 3)."""
    G: int = 2
    H: int = 2
    rank: int = 8
    n_filters: int = 16
    random_state: Optional[int] = 0
    fit: str = "weights"
    applies_to = (Conv2d,)

    def _check(self):
        for n in ("G", "H", "rank", "n_filters"):
            check_int(getattr(self, n), n, min_value=1)
        _check_fit(self.fit)

    def decompose(self, layer, data_cov):
        from .decompose.shared import shared_separable
        return shared_separable(np.array(layer.weight), self.G, self.H, rank=self.rank, n_filters=self.n_filters,
                                random_state=self.random_state, data_cov=data_cov)


@dataclass
class ApproximationReport:
    """What ``approximate`` did to one layer."""
    layer: str
    method: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    relative_error: float
    data_error: Optional[float] = None

    @property
    def gain(self):
        return self.macs_before / self.macs_after if self.macs_after else float("inf")

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["gain"] = self.gain
        return d


def approximate(net, plan, *, data=None, sequential=False, refit_above=False, ridge=1e-2, return_report=False):
    """A NEW network with the layers named in ``plan`` replaced by their factored approximations.

    Parameters
    ----------
    net : Network (left untouched)
    plan : dict layer name -> Spec
        Every name must be a layer of ``net`` (else a ValueError listing the layers).
    data : array (N, ...) of network inputs, optional
        Needed by specs with ``fit="data"`` (the covariance of each layer's input patches is collected by a
        forward pass), by ``sequential`` and ``refit_above``, and used for the report's output error of each
        approximated layer.
    sequential : bool, keyword-only
        Fit the layers in network order, each ``fit="data"`` spec on the inputs the layers approximated below it
        produce, so that its output reproduces the EXACT layer's output on the exact inputs: with ``p`` a patch
        of the exact network and ``p^`` the same patch of the approximated one, the weights and bias minimise
        ``E||W p + b - W~ p^ - b~||^2 + lam ||W~ - W||^2``. The bias comes out as ``b~ = b + W E[p] - W~ E[p^]``,
        and the weights as the spec's data-metric fit of the least-squares target ``W'`` (``W' (Cov(p^) + lam I)
        = W Cov(p, p^) + lam W``) in the metric ``Cov(p^) + lam I`` (``lam = ridge * tr(Cov(p^)) / D``: it keeps
        the directions the sample does not cover at the trained weights). Errors of stacked approximations then
        stop compounding blindly. Specs with ``fit="weights"`` are fitted to the weights as without it. The
        statistics come from float32 forward passes of ``data`` and at most 20,000 patch positions per layer;
        the inputs of every layer fitted this way must vary on ``data`` (else a ValueError naming the layer).
    refit_above : bool or sequence of str, keyword-only
        Also refit the dense ``Conv2d``/``Linear`` layers above the lowest approximated one (True: all of those
        not in ``plan``; or the names given) by the same ridge least squares, keeping them dense: the
        closed-form counterpart of the paper's fine-tuning of the layers above an approximated one. Implies
        ``sequential``.
    ridge : float, keyword-only
        The relative ridge ``lam`` above (>= 0; 0 only when the sample covers every input direction).
    return_report : bool
        Also return a list of ApproximationReport, one per approximated layer, then one per refitted layer
        (method ``"Refit"``). With ``sequential``, a report's ``data_error`` is the layer's output error against
        the exact network's same layer, on ``data``.
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be an npconv Network, got {type(net).__name__}")
    if not isinstance(plan, dict) or not plan:
        raise TypeError(f"plan must be a non-empty dict of layer name -> spec, got {plan!r}")
    for name, spec in plan.items():
        if name not in net:
            raise ValueError(f"plan names a layer the network does not have: {name!r}; layers are {net.names}")
        if not isinstance(spec, Spec):
            raise TypeError(f"plan[{name!r}] must be an npconv.approximate spec (SVD, Monochromatic, ...), "
                            f"got {type(spec).__name__}")
        spec.check_layer(name, net[name])
    if not isinstance(sequential, (bool, np.bool_)):
        raise TypeError(f"sequential must be a bool, got {type(sequential).__name__}")
    refit = _refit_names(net, plan, refit_above)
    ridge = check_real(ridge, "ridge", min_value=0.0)
    if any(getattr(s, "fit", "weights") == "data" for s in plan.values()) and data is None:
        raise ValueError("data must be given (a sample of network inputs) when a spec has fit='data'")
    if (sequential or refit) and data is None:
        raise ValueError("data must be given (a sample of network inputs) for sequential=True or refit_above")
    if net.on_gpu:
        raise ValueError("net must be on the CPU to be approximated (call net.to_cpu() first)")

    shapes = {name: shp for name, _, shp, _ in net.shapes()} if net.input_shape is not None else {}
    if sequential or refit:
        replacements, reports = _approximate_sequential(net, plan, refit, data, ridge, shapes)
    else:
        inputs = _layer_inputs(net, list(plan), data) if data is not None else {}
        replacements, reports = {}, []
        for name, spec in plan.items():
            layer = net[name]
            x_in = inputs.get(name)
            cov = None
            if spec.fit == "data":
                from .decompose.metrics import input_covariance, patch_covariance
                if isinstance(layer, Linear):
                    cov = input_covariance(x_in.reshape(len(x_in), -1))
                else:
                    KH, KW = layer.weight.shape[2:]
                    cov = patch_covariance(x_in, (KH, KW), stride=layer.stride, padding=layer.padding,
                                           max_patches=_MAX_PATCHES, random_state=0)
            result = spec.decompose(layer, cov)
            new = spec.build(layer, result)
            data_err = None
            if x_in is not None:
                xi = x_in.astype(np.float64)
                ref = layer(xi)
                data_err = float(np.linalg.norm(new(xi) - ref) / np.linalg.norm(ref))
            reports.append(_report(name, spec.describe(), layer, new, result.to_tensor(), data_err, shapes))
            replacements[name] = new
    out = net.replace(replacements)
    meta = dict(out.meta, approximations={r.layer: r.method for r in reports if r.layer in plan})
    if refit:
        meta["refitted"] = list(refit)
    out.meta = meta
    return (out, reports) if return_report else out


#: patch positions sampled for a conv layer's data statistics
_MAX_PATCHES = 20000


def _report(name, method, layer, new, approx_kernel, data_err, shapes):
    W = np.asarray(layer.weight, np.float64)
    rel = float(np.linalg.norm(W - np.asarray(approx_kernel, np.float64).reshape(W.shape)) / np.linalg.norm(W))
    shp = shapes.get(name)
    return ApproximationReport(layer=name, method=method, params_before=layer.n_params(),
                               params_after=new.n_params(), macs_before=layer.macs(shp) if shp else 0,
                               macs_after=new.macs(shp) if shp else 0, relative_error=rel, data_error=data_err)


def _refit_names(net, plan, refit_above):
    """The names of the dense layers ``refit_above`` asks to refit, in network order (validated)."""
    if refit_above is False or refit_above is None:
        return []
    order = net.names
    lowest = min(order.index(n) for n in plan)
    if refit_above is True:
        return [n for n in order[lowest + 1:] if n not in plan and isinstance(net[n], (Conv2d, Linear))]
    if isinstance(refit_above, str) or not hasattr(refit_above, "__iter__"):
        raise TypeError(f"refit_above must be a bool or a sequence of layer names, got {refit_above!r}")
    names = list(refit_above)
    for n in names:
        if n not in net:
            raise ValueError(f"refit_above names a layer the network does not have: {n!r}; layers are {net.names}")
        layer = net[n]
        if n in plan:
            raise ValueError(f"refit_above: {n!r} is in the plan (it is approximated, not refitted)")
        if not isinstance(layer, (Conv2d, Linear)):
            raise TypeError(f"refit_above: {n!r} must be a Conv2d or Linear layer, got {type(layer).__name__}")
        if isinstance(layer, Conv2d) and (layer.groups != 1 or layer.dilation != (1, 1)):
            raise ValueError(f"refit_above: {n!r} must be an ungrouped, undilated convolution")
        if order.index(n) < lowest:
            raise ValueError(f"refit_above: {n!r} lies below every approximated layer (its inputs are exact, "
                             "a refit would not change it)")
    return [n for n in order if n in names]


def _approximate_sequential(net, plan, refit, data, ridge, shapes):
    """``approximate`` with ``sequential``/``refit_above``: one pass in network order carrying each layer's input
    in the exact network (``xe``) and in the network as approximated so far (``xa``)."""
    from .decompose.metrics import paired_moments
    todo = set(plan) | set(refit)
    last = max(net.names.index(n) for n in todo)
    # the forward passes and the statistics in float32, whatever the weights' dtype: half the time and memory of
    # float64 (the second moments 4x faster), and a sample's statistics are far noisier than float32's rounding
    xe = np.asarray(data, np.float32)
    xa = xe
    replacements, reports, refit_reports = {}, [], []
    for i, (name, layer) in enumerate(net):
        if i > last:
            break
        ye = layer(xe)
        if name not in todo:
            xa = ye if xa is xe else layer(xa)
            xe = ye
            continue
        spec = plan.get(name)
        bias = None if layer.bias is None else np.asarray(layer.bias, np.float64)
        if spec is not None and spec.fit != "data":
            result = spec.decompose(layer, None)
            new = spec.build(layer, result)
            approx_kernel = result.to_tensor()
        else:
            W = np.asarray(layer.weight, np.float64)
            F = W.shape[0]
            Wm = W.reshape(F, -1)
            if isinstance(layer, Linear):
                S, C, m_h, m_e = paired_moments(xa, xe)
            else:
                S, C, m_h, m_e = paired_moments(xa, xe, W.shape[2:], stride=layer.stride, padding=layer.padding,
                                                max_patches=_MAX_PATCHES, random_state=0)
            # centred moments: the bias is free (fitted below), so only the covariances shape the weights
            raw = float(np.trace(S))
            S = S - np.outer(m_h, m_h)
            C = C - np.outer(m_h, m_e)
            if not float(np.trace(S)) > 1e-5 * raw:
                # inputs that do not vary (all-zero or constant data; below 1e-5 of the second moment the float32
                # statistics are rounding): no direction to fit, lam would be ~0 and the target zeros or noise
                raise ValueError(f"data: the inputs of layer {name!r} do not vary on data (their covariance is all "
                                 "zeros up to rounding: all-zero or constant data?), so there is nothing to fit "
                                 "the layer to; give a sample of varied network inputs")
            D = S.shape[0]
            lam = ridge * float(np.trace(S)) / D
            Sreg = S + lam * np.eye(D)
            # W' Sreg = W C^T + lam W: the ridge least-squares target, shrunk towards the trained weights (a
            # least-squares solve: with ridge 0 a direction the sample never takes, e.g. a dead ReLU, is singular)
            target = solve_psd(Sreg, C @ Wm.T + lam * Wm.T).T
            geo = {} if isinstance(layer, Linear) else dict(stride=layer.stride, padding=layer.padding)
            dt = np.asarray(layer.weight).dtype
            target = target.reshape(W.shape).astype(dt)     # the fits compute in float64 whatever the dtype
            if spec is not None:
                result = spec.decompose(_dense_like(layer, target, None, geo), Sreg)   # the weights only
                approx_kernel = result.to_tensor()
            else:
                approx_kernel = target
            At = np.asarray(approx_kernel, np.float64).reshape(F, -1)
            new_bias = ((np.zeros(F) if bias is None else bias) + Wm @ m_e - At @ m_h).astype(dt)
            if spec is not None:
                new = spec.build(_dense_like(layer, target, new_bias, geo), result)
            else:
                new = _dense_like(layer, target, new_bias, geo)
        ya = new(xa)
        ref = float(np.linalg.norm(ye.astype(np.float64).ravel()))
        err = float(np.linalg.norm((ya.astype(np.float64) - ye).ravel())) / ref if ref > 0 else None
        rep = _report(name, spec.describe() if spec is not None else "Refit", layer, new, approx_kernel, err,
                      shapes)
        (reports if spec is not None else refit_reports).append(rep)
        replacements[name] = new
        xa, xe = ya, ye
    return replacements, reports + refit_reports


def _dense_like(layer, weight, bias, geometry):
    """A Conv2d or Linear like ``layer`` with these weights and bias (float64 arrays)."""
    if isinstance(layer, Linear):
        return Linear(weight, bias)
    return Conv2d(weight, bias, **geometry)


def _layer_inputs(net, names, data):
    """The input of each named layer on ``data`` (one forward pass, float64)."""
    x = np.asarray(data, np.float64)
    prev = {}
    order = net.names
    for name in names:
        i = order.index(name)
        prev[name] = order[i - 1] if i > 0 else None
    want = sorted({p for p in prev.values() if p is not None})
    _, acts = net.forward(x, return_intermediates=want) if want else (None, {})
    return {n: (x if p is None else acts[p]) for n, p in prev.items()}
