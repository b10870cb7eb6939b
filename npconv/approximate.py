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
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from ._validate import check_int, check_option
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
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ValueError(f"{name} as a fraction of parameters kept must be in (0, 1], got {rank}")
        return rank
    return check_int(rank, name, min_value=1)


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
        if self.method == "cp":
            if self.rank is None:
                raise ValueError("rank must be given for method='cp'")
            check_int(self.rank, "rank", min_value=1)
        else:
            if self.ranks is None or len(self.ranks) != 2:
                raise ValueError(f"ranks must be a pair (K1, K2) for method='svd', got {self.ranks!r}")
            for r in self.ranks:
                check_int(r, "ranks", min_value=1)
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
        check_option(self.fit, "fit", ("weights",))

    def decompose(self, layer, data_cov):
        from .decompose.shared import shared_separable
        return shared_separable(np.array(layer.weight), self.G, self.H, rank=self.rank, n_filters=self.n_filters,
                                random_state=self.random_state)


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


def approximate(net, plan, *, data=None, return_report=False):
    """A NEW network with the layers named in ``plan`` replaced by their factored approximations.

    Parameters
    ----------
    net : Network (left untouched)
    plan : dict layer name -> Spec
    data : array (N, ...) of network inputs, optional
        Needed by specs with ``fit="data"`` (the covariance of each layer's input patches is collected by a
        forward pass) and used for the report's output error of each approximated layer.
    return_report : bool
        Also return a list of ApproximationReport, one per approximated layer.
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be an npconv Network, got {type(net).__name__}")
    if not isinstance(plan, dict) or not plan:
        raise TypeError(f"plan must be a non-empty dict of layer name -> spec, got {plan!r}")
    for name, spec in plan.items():
        if not isinstance(spec, Spec):
            raise TypeError(f"plan[{name!r}] must be an npconv.approximate spec (SVD, Monochromatic, ...), "
                            f"got {type(spec).__name__}")
        spec.check_layer(name, net[name])
    if any(getattr(s, "fit", "weights") == "data" for s in plan.values()) and data is None:
        raise ValueError("data must be given (a sample of network inputs) when a spec has fit='data'")
    if net.on_gpu:
        raise ValueError("net must be on the CPU to be approximated (call net.to_cpu() first)")

    inputs = _layer_inputs(net, list(plan), data) if data is not None else {}
    shapes = {name: shp for name, _, shp, _ in net.shapes()} if net.input_shape is not None else {}
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
                                       max_patches=20000, random_state=0)
        result = spec.decompose(layer, cov)
        new = spec.build(layer, result)
        W = np.asarray(layer.weight, np.float64)
        rel = float(np.linalg.norm(W - np.asarray(result.to_tensor(), np.float64).reshape(W.shape))
                    / np.linalg.norm(W))
        data_err = None
        if x_in is not None:
            xi = x_in.astype(np.float64)
            ref = layer(xi)
            data_err = float(np.linalg.norm(new(xi) - ref) / np.linalg.norm(ref))
        shp = shapes.get(name)
        reports.append(ApproximationReport(
            layer=name, method=spec.describe(), params_before=layer.n_params(), params_after=new.n_params(),
            macs_before=layer.macs(shp) if shp else 0, macs_after=new.macs(shp) if shp else 0,
            relative_error=rel, data_error=data_err))
        replacements[name] = new
    out = net.replace(replacements)
    out.meta = dict(out.meta, approximations={r.layer: r.method for r in reports})
    return (out, reports) if return_report else out


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
