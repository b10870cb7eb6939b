"""A Zeiler-Fergus-shaped ImageNet network with random weights, and the paper's approximation plans.

Timing needs the network's shapes, not trained values: :func:`zf_net` builds the architecture that Denton et al.
2014 time (Zeiler & Fergus 2013, as in the paper's Table/Figure set-up) with He-scaled random weights, so the
activations stay finite and of order one through the whole network.

Geometry (input 224 x 224 x 3, ``width=1``; every pooling uses ``ceil_mode=True``, as Caffe does)::

    conv1  96 @ 7x7, stride 2, pad 1   224 -> 110      relu1, pool1 3/2: 110 -> 55, norm1 (LRN 5)
    conv2 256 @ 5x5, stride 2, pad 0    55 ->  26      relu2, pool2 3/2:  26 -> 13, norm2 (LRN 5)
    conv3 384 @ 3x3, pad 1              13 ->  13      relu3
    conv4 384 @ 3x3, pad 1              13 ->  13      relu4
    conv5 256 @ 3x3, pad 1              13 ->  13      relu5, pool5 3/2:  13 ->  6
    flatten 256*6*6 = 9216, fc6 4096 + relu6, fc7 4096 + relu7, fc8 1000

Ceil-mode pooling is what gives the paper's 55 x 55 input to conv2 (floor mode would give 54) and 13 x 13 maps
for conv3-conv5 (floor: 12). Dropout is the identity at inference and is left out.

``width`` scales every channel count (``width=1/8``, ``input_size=64``, ``fc_width=128`` is the tiny network of
``bench_network --quick``); :func:`zf_plan` scales the plan the same way.

:func:`random_approximation` returns the network ``npconv.approximate.approximate(net, plan)`` would return, with
random factors of exactly the same shapes (groups balanced like ``equal_size=True`` clustering): timing depends on
the shapes only, and fitting random weights is meaningless (a CP fit of ZF conv2 with G=48 takes minutes).
"""
from __future__ import annotations

import numpy as np

__all__ = ["zf_net", "zf_plan", "zf_channels", "random_approximation", "ZF_LRN"]

#: LRN settings of the ZF/AlexNet family (PyTorch convention)
ZF_LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
_CHANNELS = (96, 256, 384, 384, 256)


def _check_width(width):
    from npconv._validate import check_real
    width = check_real(width, "width", positive=True)
    if width > 1:
        raise ValueError(f"width must be in (0, 1] (a fraction of the ZF channel counts), got {width}")
    return width


def zf_channels(width=1.0):
    """Output channels of conv1..conv5 for a channel-width multiplier ``width`` in (0, 1]."""
    width = _check_width(width)
    return tuple(max(1, int(round(c * width))) for c in _CHANNELS)


def zf_net(seed=0, dtype=np.float32, *, input_size=224, width=1.0, fc_width=4096, classes=1000):
    """A ZF-shaped npconv Network with random weights (see the module docstring for the geometry).

    Parameters
    ----------
    seed : int
        Seed of the weights (``numpy.random.default_rng``).
    dtype : float32 or float64
        Dtype of the weights.
    input_size : int, keyword-only
        Height = width of the input images (224 for the paper's network).
    width : float in (0, 1], keyword-only
        Multiplier of the conv channel counts (96, 256, 384, 384, 256).
    fc_width : int, keyword-only
        Units of fc6 and fc7 (4096).
    classes : int, keyword-only
        Units of fc8 (1000).

    Weights are ``N(0, 2 / fan_in)`` (He scaling: about ``1/sqrt(fan_in)``), biases ``N(0, 0.01^2)``.
    ``net.meta["zf"]`` records the settings.
    """
    from npconv import Network
    from npconv._validate import check_int
    from npconv.layers import Conv2d, Flatten, Linear, LocalResponseNorm, MaxPool2d, ReLU

    seed = check_int(seed, "seed", min_value=0)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    input_size = check_int(input_size, "input_size", min_value=1)
    fc_width = check_int(fc_width, "fc_width", min_value=1)
    classes = check_int(classes, "classes", min_value=1)
    c1, c2, c3, c4, c5 = zf_channels(width)
    rng = np.random.default_rng(seed)

    def conv(cout, cin, k, stride, padding):
        w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / (cin * k * k)))
        b = rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01)
        return Conv2d(w.astype(dtype), b.astype(dtype), stride=stride, padding=padding)

    def fc(cout, cin):
        w = rng.standard_normal((cout, cin), dtype=np.float32) * np.float32(np.sqrt(2.0 / cin))
        b = rng.standard_normal(cout, dtype=np.float32) * np.float32(0.01)
        return Linear(w.astype(dtype), b.astype(dtype))

    def pool():
        return MaxPool2d(3, stride=2, ceil_mode=True)

    layers = [
        ("conv1", conv(c1, 3, 7, 2, 1)), ("relu1", ReLU()), ("pool1", pool()), ("norm1", LocalResponseNorm(**ZF_LRN)),
        ("conv2", conv(c2, c1, 5, 2, 0)), ("relu2", ReLU()), ("pool2", pool()), ("norm2", LocalResponseNorm(**ZF_LRN)),
        ("conv3", conv(c3, c2, 3, 1, 1)), ("relu3", ReLU()),
        ("conv4", conv(c4, c3, 3, 1, 1)), ("relu4", ReLU()),
        ("conv5", conv(c5, c4, 3, 1, 1)), ("relu5", ReLU()), ("pool5", pool()),
        ("flatten", Flatten()),
    ]
    # the flattened size follows from the geometry (9216 for the paper's network)
    probe = Network(layers, input_shape=(3, input_size, input_size))
    n_flat = probe.shapes()[-1][3][0]
    layers += [("fc6", fc(fc_width, n_flat)), ("relu6", ReLU()),
               ("fc7", fc(fc_width, fc_width)), ("relu7", ReLU()),
               ("fc8", fc(classes, fc_width))]
    meta = {"name": "zf-random", "zf": {"seed": seed, "dtype": dtype.name, "input_size": input_size,
                                        "width": float(width), "fc_width": fc_width, "classes": classes},
            "note": "random He-scaled weights, for timing only"}
    return Network(layers, input_shape=(3, input_size, input_size), meta=meta)


def zf_plan(conv2="cp", *, upper=False, width=1.0, fc_width=4096):
    """The paper's approximation plan for :func:`zf_net` (a dict layer name -> spec for ``approximate``).

    Parameters
    ----------
    conv2 : "cp" or "svd"
        ``"cp"``: ``Bicluster(G=48, H=2, rank=8, method="cp")`` (two input channels per group, as in the paper);
        ``"svd"``: ``Bicluster(G=2, H=2, ranks=(19, 51), method="svd")``.
    upper : bool, keyword-only
        Also approximate conv3-conv5 (Bicluster-SVD, G=2, H=2, ranks (32, 64)), which the paper leaves dense.
        Without it conv3-conv5 hold about 45 % of the network's multiply-adds, which bounds the whole-network
        gain near 1.7x; with it the theoretical gain is about 5x.
    width, fc_width : keyword-only
        The settings given to :func:`zf_net`; group counts and ranks scale with ``width``, the fc ranks are
        ``fc_width // 8`` (512 for fc6 and fc7 of the paper's network).

    conv1 is always ``Monochromatic(colors=6)``; fc6 and fc7 are ``SVD(rank=fc_width // 8)``; fc8 stays dense.
    """
    from npconv._validate import check_int, check_option
    from npconv.approximate import SVD, Bicluster, Monochromatic

    check_option(conv2, "conv2", ("cp", "svd"))
    if not isinstance(upper, (bool, np.bool_)):
        raise TypeError(f"upper must be a bool, got {type(upper).__name__}")
    width = _check_width(width)
    fc_width = check_int(fc_width, "fc_width", min_value=1)
    c1, c2, c3, c4, c5 = zf_channels(width)

    def scaled(v, limit=None):
        v = max(1, int(round(v * width)))
        return v if limit is None else min(v, limit)

    colors = min(6, c1)
    plan = {"conv1": Monochromatic(colors=colors)}
    if conv2 == "cp":
        plan["conv2"] = Bicluster(G=max(1, c1 // 2), H=min(2, c2), rank=8, method="cp")
    else:
        k1 = scaled(19, limit=max(1, c1 // 2))
        plan["conv2"] = Bicluster(G=min(2, c1), H=min(2, c2), ranks=(k1, scaled(51, limit=max(1, c2 // 2))),
                                  method="svd")
    if upper:
        for name, cin in (("conv3", c2), ("conv4", c3), ("conv5", c4)):
            k1 = scaled(32, limit=max(1, cin // 2))
            plan[name] = Bicluster(G=min(2, cin), H=2, ranks=(k1, scaled(64)), method="svd")
    rank = max(1, fc_width // 8)
    plan["fc6"] = SVD(rank=rank)
    plan["fc7"] = SVD(rank=rank)
    return plan


def _balanced_groups(n, k, rng):
    """A random balanced grouping of n channels into k groups: (perm, offsets) as npconv's clustering stores them
    (group sizes n // k or n // k + 1, channels ascending inside a group)."""
    from npconv.decompose.bicluster import channel_groups
    sizes = [len(a) for a in np.array_split(np.arange(n), k)]
    labels = rng.permutation(np.repeat(np.arange(k), sizes))
    return channel_groups(labels, k)


def _normal(rng, shape, fan_in, dtype, gain=1.0):
    return (rng.standard_normal(shape) * (gain / np.sqrt(max(fan_in, 1)))).astype(dtype)


def _random_result(spec, layer, rng):
    """A decomposition result of the type and shapes ``spec.decompose(layer, None)`` returns, with random factors;
    None for specs without a random counterpart."""
    from npconv.approximate import SVD, Bicluster, Monochromatic, Separable
    from npconv._validate import check_int
    from npconv.decompose.bicluster import BiclusterCPResult, BiclusterSVDResult, max_bicluster_ranks
    from npconv.decompose.monochromatic import MonochromaticResult
    from npconv.decompose.separable import SeparableResult
    from npconv.decompose.svd import ConvLowRankResult, LowRankResult, resolve_rank
    from npconv.layers import Linear

    W = layer.weight
    dt = W.dtype
    g2 = np.sqrt(2.0)
    if isinstance(spec, SVD):
        if isinstance(layer, Linear):
            out_f, in_f = W.shape
            t = resolve_rank(spec.rank, out_f, in_f)
            return LowRankResult(_normal(rng, (out_f, t), t, dt, g2), _normal(rng, (t, in_f), in_f, dt))
        F = W.shape[0]
        D = int(np.prod(W.shape[1:]))
        t = resolve_rank(spec.rank, F, D)
        return ConvLowRankResult(_normal(rng, (F, t), t, dt, g2), _normal(rng, (t,) + W.shape[1:], D, dt))
    F, C, X, Y = W.shape
    if isinstance(spec, Monochromatic):
        Cp = spec.colors
        if not 1 <= Cp <= F:
            raise ValueError(f"colors must be in [1, {F}] for a layer with {F} filters, got {Cp}")
        sizes = [len(a) for a in np.array_split(np.arange(F), Cp)]
        assignment = rng.permutation(np.repeat(np.arange(Cp), sizes)).astype(np.int64)
        return MonochromaticResult(_normal(rng, (Cp, C), C, dt), assignment, _normal(rng, (F, X, Y), X * Y, dt, g2))
    if isinstance(spec, Separable):
        K = check_int(spec.rank, "rank", min_value=1, max_value=min(C * X, F * Y))
        return SeparableResult(_normal(rng, (K, C, X, 1), C * X, dt), _normal(rng, (F, K, 1, Y), K * Y, dt, g2))
    if isinstance(spec, Bicluster):
        G, H = spec.G, spec.H
        if not (1 <= G <= C and 1 <= H <= F):
            raise ValueError(f"G must be in [1, {C}] and H in [1, {F}], got G={G}, H={H}")
        cg = C // G
        # the rank limits of npconv.decompose.bicluster (the smallest blocks bound the ranks)
        lim = max_bicluster_ranks((F // H, cg, X, Y))
        if spec.method == "cp":
            K = check_int(spec.rank, "rank", min_value=1, max_value=lim["cp"])
        else:
            K1 = check_int(spec.ranks[0], "ranks[0] (K1)", min_value=1, max_value=lim["svd"][0])
            K2 = check_int(spec.ranks[1], "ranks[1] (K2)", min_value=1, max_value=min(K1 * X * Y, F // H))
        in_perm, in_off = _balanced_groups(C, G, rng)
        out_perm, out_off = _balanced_groups(F, H, rng)
        if spec.method == "cp":
            return BiclusterCPResult(in_perm, in_off, _normal(rng, (C, H, K), cg, dt),
                                     _normal(rng, (G, H, K, X), X, dt), _normal(rng, (G, H, K, Y), Y, dt),
                                     _normal(rng, (F, G, K), G * K, dt, g2), out_perm, out_off)
        return BiclusterSVDResult(in_perm, in_off, _normal(rng, (C, H, K1), cg, dt),
                                  _normal(rng, (G, H, K2, K1, X, Y), K1 * X * Y, dt),
                                  _normal(rng, (F, G, K2), G * K2, dt, g2), out_perm, out_off)
    return None


def random_approximation(net, plan, *, seed=0):
    """The network ``approximate(net, plan)`` would return, with random factors of the same shapes.

    Every spec is checked against its layer as ``approximate`` does (``spec.check_layer``) and its layer is built
    by ``spec.build`` (the factored layer class and options ``approximate`` uses); only the fitting is replaced
    by random factors. Specs without a random counterpart (e.g. ``SharedSeparable``) are fitted for real.
    ``net`` is left untouched; ``net.meta["approximations"]`` of the result names the specs, with
    ``"factors": "random"``.
    """
    from npconv import Network
    from npconv._validate import check_int
    from npconv.approximate import Spec

    if not isinstance(net, Network):
        raise TypeError(f"net must be an npconv Network, got {type(net).__name__}")
    if not isinstance(plan, dict) or not plan:
        raise TypeError(f"plan must be a non-empty dict of layer name -> spec, got {plan!r}")
    rng = np.random.default_rng(check_int(seed, "seed", min_value=0))
    replacements = {}
    for name, spec in plan.items():
        if not isinstance(spec, Spec):
            raise TypeError(f"plan[{name!r}] must be an npconv.approximate spec, got {type(spec).__name__}")
        layer = net[name]
        spec.check_layer(name, layer)
        result = _random_result(spec, layer, rng)
        if result is None:
            result = spec.decompose(layer, None)
        replacements[name] = spec.build(layer, result)
    out = net.replace(replacements)
    out.meta = dict(out.meta, approximations={n: s.describe() for n, s in plan.items()}, factors="random")
    return out
