"""The network-level benchmark (bench/bench_network.py, bench/zf_net.py, bench/torch_factored.py).

No timing figure is asserted. What is checked: ``run_all.py --quick --only network`` runs end to end and writes
parseable outputs with the expected rows and operation counts; the ZF network has the paper's shapes (written out
by hand below); the plans are the paper's; the random-factor approximation has exactly the layers ``approximate``
builds; and every PyTorch equivalent computes what the npconv layer computes (so the benchmark compares the same
maths), checked against npconv and against a dense torch conv of the rebuilt kernel.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reference import tolerance  # noqa: E402

QUICK = dict(input_size=64, width=1 / 8, fc_width=128, classes=100)
LRN_SIZE = 5


# ------------------------------------------------------------------------------------------- hand-written ZF
def conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def pool_ceil(n, k=3, s=2):
    return -(-(n - k) // s) + 1


def zf_expected(size, c, fc, classes):
    """(name, output shape, MACs per image) of every layer, computed by hand from the ZF recipe."""
    c1, c2, c3, c4, c5 = c
    h1 = conv_out(size, 7, 2, 1)
    p1 = pool_ceil(h1)
    h2 = conv_out(p1, 5, 2, 0)
    p2 = pool_ceil(h2)
    p5 = pool_ceil(p2)
    flat = c5 * p5 * p5
    return [
        ("conv1", (c1, h1, h1), c1 * 3 * 49 * h1 * h1), ("relu1", (c1, h1, h1), 0), ("pool1", (c1, p1, p1), 0),
        ("norm1", (c1, p1, p1), c1 * p1 * p1 * (LRN_SIZE + 2)),
        ("conv2", (c2, h2, h2), c2 * c1 * 25 * h2 * h2), ("relu2", (c2, h2, h2), 0), ("pool2", (c2, p2, p2), 0),
        ("norm2", (c2, p2, p2), c2 * p2 * p2 * (LRN_SIZE + 2)),
        ("conv3", (c3, p2, p2), c3 * c2 * 9 * p2 * p2), ("relu3", (c3, p2, p2), 0),
        ("conv4", (c4, p2, p2), c4 * c3 * 9 * p2 * p2), ("relu4", (c4, p2, p2), 0),
        ("conv5", (c5, p2, p2), c5 * c4 * 9 * p2 * p2), ("relu5", (c5, p2, p2), 0), ("pool5", (c5, p5, p5), 0),
        ("flatten", (flat,), 0), ("fc6", (fc,), fc * flat), ("relu6", (fc,), 0), ("fc7", (fc,), fc * fc),
        ("relu7", (fc,), 0), ("fc8", (classes,), classes * fc),
    ]


QUICK_CH = (12, 32, 48, 48, 32)


def test_zf_net_paper_shapes():
    from bench.zf_net import zf_net
    net = zf_net()
    rows = net.summary(print_fn=None)
    got = [(r["name"], tuple(r["output_shape"]), r["macs"]) for r in rows]
    want = zf_expected(224, (96, 256, 384, 384, 256), 4096, 1000)
    assert got == want
    # the paper's geometry, literally: conv2 reads 55x55, conv3-conv5 run at 13x13, fc6 reads 6*6*256
    shapes = dict((r["name"], tuple(r["output_shape"])) for r in rows)
    assert shapes["pool1"] == (96, 55, 55) and shapes["pool2"] == (256, 13, 13) and shapes["flatten"] == (9216,)
    assert net.input_shape == (3, 224, 224)
    assert net["conv1"].weight.dtype == np.float32


def test_zf_net_quick_shapes_and_forward():
    from bench.zf_net import zf_channels, zf_net
    assert zf_channels(1 / 8) == QUICK_CH
    net = zf_net(seed=3, dtype=np.float64, **QUICK)
    got = [(r["name"], tuple(r["output_shape"]), r["macs"]) for r in net.summary(print_fn=None)]
    assert got == zf_expected(64, QUICK_CH, 128, 100)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64))
    y = net.forward(x)
    assert y.shape == (2, 100) and y.dtype == np.float64 and np.isfinite(y).all()
    assert 1e-3 < np.abs(y).max() < 1e3  # He-scaled weights keep the activations of order one
    # fan-in scaling of the weights (std sqrt(2 / fan_in)), and seeds repeat
    w = net["conv4"].weight
    assert abs(w.std() / np.sqrt(2.0 / (48 * 9)) - 1) < 0.1
    np.testing.assert_array_equal(zf_net(seed=3, dtype=np.float64, **QUICK)["fc6"].weight, net["fc6"].weight)


def test_zf_net_rejects_bad_arguments():
    from bench.zf_net import zf_net, zf_plan
    with pytest.raises(ValueError, match="width"):
        zf_net(width=1.5)
    with pytest.raises(TypeError, match="dtype"):
        zf_net(dtype=np.int32)
    with pytest.raises(ValueError, match="input_size"):
        zf_net(input_size=0)
    with pytest.raises(ValueError, match="conv2"):
        zf_plan("tucker")
    with pytest.raises(TypeError, match="upper"):
        zf_plan(upper="yes")


def test_zf_plan_is_the_papers():
    from npconv.approximate import SVD, Bicluster, Monochromatic
    from bench.zf_net import zf_plan
    p = zf_plan()
    assert p == {"conv1": Monochromatic(colors=6), "conv2": Bicluster(G=48, H=2, rank=8, method="cp"),
                 "fc6": SVD(rank=512), "fc7": SVD(rank=512)}
    assert zf_plan("svd")["conv2"] == Bicluster(G=2, H=2, ranks=(19, 51), method="svd")
    up = zf_plan(upper=True)
    assert set(up) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"}
    assert all(up[n] == Bicluster(G=2, H=2, ranks=(32, 64), method="svd") for n in ("conv3", "conv4", "conv5"))


def test_random_approximation_builds_what_approximate_builds():
    import npconv.layers.bicluster  # noqa: F401
    import npconv.layers.lowrank  # noqa: F401
    from npconv.approximate import approximate
    from bench.zf_net import random_approximation, zf_net, zf_plan
    net = zf_net(**QUICK)
    plan = zf_plan("cp", upper=True, width=QUICK["width"], fc_width=QUICK["fc_width"])
    fitted = approximate(net, plan)
    rand = random_approximation(net, plan, seed=5)
    assert rand.names == fitted.names
    for name in net.names:
        a, b = fitted[name], rand[name]
        assert type(a) is type(b), name
        assert {k: v.shape for k, v in a.params.items()} == {k: v.shape for k, v in b.params.items()}, name
        assert a.config() == b.config(), name
    assert [r["macs"] for r in fitted.summary(print_fn=None)] == [r["macs"] for r in rand.summary(print_fn=None)]
    # the groups are balanced permutations, the untouched layers are copies of the original ones
    l2 = rand["conv2"]
    assert sorted(l2.params["in_perm"].tolist()) == list(range(QUICK_CH[0]))
    assert np.diff(l2.params["in_offsets"]).tolist() == [2] * 6
    np.testing.assert_array_equal(rand["fc8"].weight, net["fc8"].weight)
    assert rand["fc8"].weight is not net["fc8"].weight
    y = rand.forward(np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32))
    assert np.isfinite(y).all() and 1e-3 < np.abs(y).max() < 1e3
    with pytest.raises(TypeError, match="Monochromatic applies to Conv2d"):
        random_approximation(net, {"fc6": plan["conv1"]})
    # the rank limits of the real decompositions hold (blocks of conv2 are (16, 2, 5, 5): CP rank <= 50)
    from npconv.approximate import Bicluster, Separable
    for spec in (Bicluster(G=6, H=2, rank=51, method="cp"), Bicluster(G=2, H=2, ranks=(7, 3), method="svd"),
                 Bicluster(G=2, H=2, ranks=(6, 17), method="svd"), Separable(rank=61)):
        with pytest.raises(ValueError, match="rank"):
            random_approximation(net, {"conv2": spec})


# -------------------------------------------------------------------------------------------- end to end
def _run_quick(out):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["NPCONV_BENCH_THREADS"] = "1"  # a shared machine: keep the smoke run short and free of thread contention
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "network",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_quick_run_end_to_end(tmp_path):
    p = _run_quick(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    res = {r["name"]: r for r in doc["results"] if r["module"] == "network"}
    with open(tmp_path / "results.csv", newline="") as f:
        csv_rows = {r["name"]: r for r in csv.DictReader(f) if r["module"] == "network"}
    assert set(csv_rows) == set(res)
    assert not [n for n, r in res.items() if r["status"] == "error"]
    try:
        import torch  # noqa: F401
        impls = ("npconv", "torch")
    except ImportError:
        impls = ("npconv",)
    want = zf_expected(64, QUICK_CH, 128, 100)
    dense_macs = sum(m for _, _, m in want)
    for N in (1, 4):
        for v in ("dense", "paper", "all"):
            for impl in impls:
                r = res[f"zf/batch/{v}/{impl}/b{N}"]
                assert r["status"] == "ok" and r["median_s"] > 0 and r["threads"] == 1
                assert r["meta"]["batch"] == N and r["meta"]["variant"] == v and r["meta"]["impl"] == impl
        assert res[f"zf/batch/dense/npconv/b{N}"]["flops"] == 2 * dense_macs * N
    for name, _, macs in want:
        for impl in impls:
            r = res[f"zf/layers-b2/dense/{impl}/{name}"]
            assert r["status"] == "ok" and r["flops"] == 2 * macs * 2, name
    for v, layers in (("paper", ("conv1", "conv2", "fc6", "fc7")), ("paper-svd", ("conv2",)),
                      ("all", ("conv3", "conv4", "conv5"))):
        for layer in layers:
            for impl in impls:
                r = res[f"zf/layers-b2/{v}/{impl}/{layer}"]
                assert r["status"] == "ok" and r["baseline"] == f"zf/layers-b2/dense/{impl}/{layer}"
                assert r["speedup"] is not None and r["speedup"] > 0
    assert res["zf/layers-b2/paper/npconv/conv1"]["meta"]["kind"] == "monochromatic_conv2d"
    assert res["zf/layers-b2/paper/npconv/conv1"]["flops"] < res["zf/layers-b2/dense/npconv/conv1"]["flops"]
    if "torch" in impls:
        r = res["zf/batch/dense/npconv/b4"]
        assert r["baseline"] == "zf/batch/dense/torch/b4" and r["speedup"] > 0
    cifar = [r for n, r in res.items() if n.startswith("cifar/")]
    assert cifar and all(r["status"] in ("ok", "skipped") for r in cifar)
    if any(r["status"] == "skipped" for r in cifar):
        assert "reference network" in cifar[0]["error"]
    assert doc["peaks"]["cpu/float32"]["gflops"] > 0
    # the summary of the written results
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    s = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_network.py"), "--from-json",
                        str(tmp_path / "results.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert s.returncode == 0, s.stderr[-2000:]
    assert "[zf] per-image time (ms) against batch size" in s.stdout
    assert "[zf] per-layer breakdown of the dense network at batch 2" in s.stdout
    assert "npconv paper vs npconv dense" in s.stdout
    assert "goal, whole ZF network at batch 4" in s.stdout


# ----------------------------------------------------------------------------------------- torch equivalence
def _balanced(n, k, rng):
    sizes = [len(a) for a in np.array_split(np.arange(n), k)]
    perm = rng.permutation(n)
    return perm.astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _noncontig(rng, shape, dtype):
    """A non-contiguous array of ``shape`` (every other column of a wider one)."""
    big = rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(dtype)
    x = big[..., ::2]
    assert not x.flags.c_contiguous
    return x


def _dense_ref(torch, x, W, bias, stride, pad4):
    """torch conv of the rebuilt kernel W (F, C, X, Y) with padding (top, bottom, left, right)."""
    t, b, l, r = pad4
    xt = torch.nn.functional.pad(torch.from_numpy(np.ascontiguousarray(x)), (l, r, t, b))
    bt = None if bias is None else torch.from_numpy(bias)
    return torch.nn.functional.conv2d(xt, torch.from_numpy(np.ascontiguousarray(W)), bt, stride=stride).numpy()


def _check(got, *refs, dtype):
    rtol, atol = tolerance(dtype)
    for ref in refs:
        assert got.shape == ref.shape
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * scale)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("G,H", [(3, 2), (7, 3), (1, 1)])
@pytest.mark.parametrize("stride,pad", [((2, 1), (1, 0, 2, 1)), (1, 1)])
def test_torch_bicluster_matches_npconv(dtype, G, H, stride, pad):
    import torch
    from npconv._validate import as_padding4
    from npconv.decompose.bicluster import BiclusterCPResult, BiclusterSVDResult
    from npconv.layers.bicluster import BiclusterConv2d
    from bench.torch_factored import TorchBiclusterCP, TorchBiclusterSVD, torch_layer
    rng = np.random.default_rng(G * 10 + H)
    C, F, X, Y = 7, 9, 3, 2
    x = _noncontig(rng, (2, C, 11, 10), dtype)
    b = rng.standard_normal(F).astype(dtype)
    ip, io = _balanced(C, G, rng)
    op, oo = _balanced(F, H, rng)

    def r(*s):
        return rng.standard_normal(s).astype(dtype)

    cp = BiclusterCPResult(ip, io, r(C, H, 3), r(G, H, 3, X), r(G, H, 3, Y), r(F, G, 3), op, oo)
    svd = BiclusterSVDResult(ip, io, r(C, H, 2), r(G, H, 3, 2, X, Y), r(F, G, 3), op, oo)
    for res, cls in ((cp, TorchBiclusterCP), (svd, TorchBiclusterSVD)):
        layer = BiclusterConv2d.from_result(res, bias=b, stride=stride, padding=pad)
        mod = torch_layer(layer, dtype=dtype)
        assert isinstance(mod, cls)
        got = mod(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        assert got.dtype == dtype
        ref = _dense_ref(torch, x, res.to_tensor(), b, stride, as_padding4(pad))
        _check(got, layer(x), ref, dtype=dtype)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("equal", [True, False])
def test_torch_monochromatic_matches_npconv(dtype, equal):
    import torch
    from npconv.decompose.monochromatic import MonochromaticResult
    from bench.torch_factored import TorchMonochromaticConv2d, torch_layer
    rng = np.random.default_rng(7)
    C, F, Cp = 3, 8, 4
    a = (np.repeat(np.arange(Cp), 2)[rng.permutation(F)] if equal
         else np.array([0, 0, 0, 0, 0, 1, 3, 3])).astype(np.int64)   # colour 2 unused
    res = MonochromaticResult(rng.standard_normal((Cp, C)).astype(dtype), a,
                              rng.standard_normal((F, 5, 4)).astype(dtype))
    b = rng.standard_normal(F).astype(dtype)
    layer = res.to_layer(bias=b, stride=(2, 1), padding=(2, 1, 0, 3))
    mod = torch_layer(layer, dtype=dtype)
    assert isinstance(mod, TorchMonochromaticConv2d)
    x = _noncontig(rng, (2, C, 13, 12), dtype)
    got = mod(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    _check(got, layer(x), _dense_ref(torch, x, res.to_tensor(), b, (2, 1), (2, 1, 0, 3)), dtype=dtype)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_lowrank_and_separable_match_npconv(dtype):
    import torch
    from npconv.decompose.separable import SeparableResult
    from npconv.decompose.svd import ConvLowRankResult, LowRankResult
    from bench.torch_factored import (TorchLowRankConv2d, TorchLowRankLinear, TorchSeparableConv2d, torch_layer)
    rng = np.random.default_rng(11)
    C, F = 5, 6

    def r(*s):
        return rng.standard_normal(s).astype(dtype)

    b = r(F)
    x = _noncontig(rng, (3, C, 9, 8), dtype)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    conv = ConvLowRankResult(r(F, 4), r(4, C, 3, 3))
    layer = conv.to_layer(bias=b, stride=2, padding=1)
    mod = torch_layer(layer, dtype=dtype)
    assert isinstance(mod, TorchLowRankConv2d)
    _check(mod(xt).numpy(), layer(x), _dense_ref(torch, x, conv.to_tensor(), b, 2, (1, 1, 1, 1)), dtype=dtype)
    sep = SeparableResult(r(4, C, 3, 1), r(F, 4, 1, 2))
    layer = sep.to_layer(bias=b, stride=(1, 2), padding=(0, 2, 1, 0))
    mod = torch_layer(layer, dtype=dtype)
    assert isinstance(mod, TorchSeparableConv2d)
    _check(mod(xt).numpy(), layer(x), _dense_ref(torch, x, sep.to_tensor(), b, (1, 2), (0, 2, 1, 0)), dtype=dtype)
    lin = LowRankResult(r(F, 3), r(3, C * 4))
    layer = lin.to_layer(bias=b)
    mod = torch_layer(layer, dtype=dtype)
    assert isinstance(mod, TorchLowRankLinear)
    z = _noncontig(rng, (4, C, 2, 2), dtype)        # more than 2 dims: flattened, as npconv's Linear does
    ref = np.ascontiguousarray(z).reshape(4, -1) @ lin.to_tensor().T + b
    _check(mod(torch.from_numpy(np.ascontiguousarray(z))).numpy(), layer(z), ref, dtype=dtype)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_net_matches_npconv_networks(dtype):
    import torch
    from bench.torch_factored import torch_net
    from bench.zf_net import random_approximation, zf_net, zf_plan
    net = zf_net(seed=2, dtype=dtype, **QUICK)
    x = np.random.default_rng(4).standard_normal((3, 3, 64, 64)).astype(dtype)
    plans = [zf_plan(c, upper=u, width=QUICK["width"], fc_width=QUICK["fc_width"])
             for c, u in (("cp", False), ("svd", True))]
    for n in [net] + [random_approximation(net, p, seed=1) for p in plans]:
        model = torch_net(n, dtype=dtype)
        assert list(dict(model.named_children())) == n.names
        with torch.inference_mode():
            got = model(torch.from_numpy(x)).numpy()
        _check(got, n.forward(x), dtype=dtype)


@pytest.mark.torch
def test_torch_net_simple_layers_and_errors():
    import torch
    from npconv import Network
    from npconv.layers import (AvgPool2d, Conv2d, Dropout, Flatten, Layer, Linear, MaxPool2d, Normalize, ReLU,
                               Softmax)
    from bench.torch_factored import torch_layer, torch_net
    rng = np.random.default_rng(3)
    net = Network([("norm", Normalize(np.array([1.0, 2.0]), np.array([0.5, 3.0]))),
                   ("conv", Conv2d(rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4), padding=(0, 1, 2, 1))),
                   ("relu", ReLU()), ("max", MaxPool2d(3, stride=2, padding=1, ceil_mode=True)),
                   ("avg", AvgPool2d(2, count_include_pad=False, padding=1)), ("drop", Dropout(0.3)),
                   ("flat", Flatten()), ("fc", Linear(rng.standard_normal((5, 4 * 4 * 4)), None)),
                   ("soft", Softmax())], input_shape=(2, 11, 9))
    x = rng.standard_normal((2, 2, 11, 9))
    with torch.inference_mode():
        got = torch_net(net, dtype=np.float64)(torch.from_numpy(x)).numpy()
    _check(got, net.forward(x), dtype=np.float64)
    with pytest.raises(TypeError, match="no PyTorch equivalent"):
        torch_layer(Layer())
    with pytest.raises(TypeError, match="dtype"):
        torch_net(net, dtype=np.int64)
