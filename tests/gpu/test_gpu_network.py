"""Whole networks on a real device: ``Network.to_gpu()`` then ``forward`` on CuPy input equals the CPU forward of
the same network (itself tested against PyTorch and naive loops), for the bundled reference network, its
approximation (monochromatic conv1, biclustered-SVD conv2, fitted by ``approximate``) and a small ZF-shaped network
with every factored kind (``bench.zf_net.random_approximation``). Also: the intermediates come back on the device,
``to_cpu()`` restores NumPy results, and NumPy input to a network on the GPU is a TypeError.

Skipped without a CUDA device; ``NPCONV_REQUIRE_GPU=1`` makes the skips failures.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gpu_helpers import need_stream_capture

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.gpu


def _close(cp, y, ref, rtol):
    assert isinstance(y, cp.ndarray), f"expected a cupy.ndarray, got {type(y).__name__}"
    assert y.shape == ref.shape and y.dtype == ref.dtype
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(cp.asnumpy(y), ref, rtol=rtol, atol=rtol * scale)


def _reference_or_skip():
    from npconv.models import load_reference, reference_path
    if not Path(reference_path()).exists():
        pytest.skip(f"the bundled reference network {reference_path()} is missing")
    return load_reference()


def _cifar_batch(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("variant", ["dense", "approx"])
def test_reference_network_gpu_matches_cpu(cp, variant):
    net = _reference_or_skip()
    if variant == "approx":
        from npconv.approximate import Bicluster, Monochromatic, approximate
        net = approximate(net, {"conv1": Monochromatic(colors=8),
                                "conv2": Bicluster(G=2, H=2, ranks=(16, 48), method="svd")})
    x = _cifar_batch(5)
    ref, acts_ref = net.forward(x, return_intermediates="all")
    assert net.to_gpu() is net and net.on_gpu
    y, acts = net.forward(cp.asarray(x), return_intermediates="all")
    _close(cp, y, ref, 2e-4)
    for name, a in acts_ref.items():
        _close(cp, acts[name], a, 2e-4)
    # the same predictions, and the network comes back to the host unchanged
    assert np.array_equal(cp.asnumpy(y).argmax(1), ref.argmax(1))
    net.to_cpu()
    assert not net.on_gpu
    np.testing.assert_allclose(net.forward(x), ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))


def test_numpy_input_to_a_gpu_network_is_a_type_error(cp):
    net = _reference_or_skip().to_gpu()
    with pytest.raises(TypeError, match="numpy|NumPy|cupy|CuPy"):
        net.forward(_cifar_batch(1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_small_zf_network_with_every_factored_kind(cp, dtype):
    import npconv.layers.bicluster  # noqa: F401  (register the factored layer kinds)
    import npconv.layers.lowrank  # noqa: F401
    from bench.zf_net import random_approximation, zf_net, zf_plan
    kw = dict(input_size=64, width=1 / 8, fc_width=128, classes=100)
    dense = zf_net(seed=0, dtype=dtype, **kw)
    for plan in (None, zf_plan("cp", upper=True, width=1 / 8, fc_width=128), zf_plan("svd", width=1 / 8,
                                                                                      fc_width=128)):
        net = dense if plan is None else random_approximation(dense, plan, seed=1)
        x = np.random.default_rng(2).standard_normal((3,) + net.input_shape).astype(dtype)
        ref = net.forward(x)
        gnet = net.copy().to_gpu()
        y = gnet.forward(cp.asarray(x))
        _close(cp, y, ref, 5e-4 if dtype == np.float32 else 1e-10)
        # non-contiguous device input gives the same result
        big = cp.zeros((3,) + tuple(2 * n for n in net.input_shape), dtype=dtype)
        view = big[:, ::2, ::2, ::2]
        view[...] = cp.asarray(x)
        _close(cp, gnet.forward(view), ref, 5e-4 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("variant", ["dense", "approx"])
def test_cuda_graph_replays_the_forward_pass(cp, variant):
    """``Network.cuda_graph``: replays equal the eager forward pass for new inputs, also after CuPy's default pool
    was emptied; ``copy=False`` hands out the graph's own output buffer; another shape is refused."""
    need_stream_capture(cp)
    net = _reference_or_skip()
    if variant == "approx":
        from npconv.approximate import Bicluster, Monochromatic, approximate
        net = approximate(net, {"conv1": Monochromatic(colors=8),
                                "conv2": Bicluster(G=2, H=2, ranks=(16, 48), method="svd")})
    net.to_gpu()
    fn = net.cuda_graph(cp.asarray(_cifar_batch(4, seed=1)))
    assert fn.output_shape == (4, 10)
    for seed in (2, 3):
        x = cp.asarray(_cifar_batch(4, seed=seed))
        ref = cp.asnumpy(net.forward(x))
        _close(cp, fn(x), ref, 1e-5)
    cp.get_default_memory_pool().free_all_blocks()
    x = cp.asarray(_cifar_batch(4, seed=4))
    _close(cp, fn(x), cp.asnumpy(net.forward(x)), 1e-5)
    a = fn(x, copy=False)
    b = fn(cp.asarray(_cifar_batch(4, seed=5)), copy=False)
    assert a is b
    with pytest.raises(ValueError, match="recorded shape"):
        fn(cp.asarray(_cifar_batch(5)))
    with pytest.raises(TypeError, match="cupy"):
        fn(_cifar_batch(4))


def test_cuda_graph_of_a_small_zf_network_with_every_factored_kind(cp):
    need_stream_capture(cp)
    import npconv.layers.bicluster  # noqa: F401
    import npconv.layers.lowrank  # noqa: F401
    from bench.zf_net import random_approximation, zf_net, zf_plan
    dense = zf_net(seed=0, dtype=np.float32, input_size=64, width=1 / 8, fc_width=128, classes=100)
    net = random_approximation(dense, zf_plan("cp", upper=True, width=1 / 8, fc_width=128), seed=1).to_gpu()
    rng = np.random.default_rng(3)
    x0 = cp.asarray(rng.standard_normal((2,) + net.input_shape).astype(np.float32))
    fn = net.cuda_graph(x0, until="conv5")
    for _ in range(2):
        x = cp.asarray(rng.standard_normal((2,) + net.input_shape).astype(np.float32))
        _close(cp, fn(x), cp.asnumpy(net.forward(x, until="conv5")), 1e-5)
