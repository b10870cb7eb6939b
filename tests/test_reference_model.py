"""The bundled reference network against the training tool's own outputs (stored when it was exported)."""
import os

import numpy as np
import pytest

from npconv.models import load_reference

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def net():
    return load_reference()


def test_architecture_is_the_papers_kind(net):
    kinds = [l.kind for _, l in net]
    assert net.input_shape == (3, 32, 32)
    conv1 = net["conv1"].weight
    assert conv1.shape[0] >= 64 and conv1.shape[1] == 3 and conv1.shape[2] >= 5
    assert kinds.count("conv2d") >= 3 and kinds.count("linear") >= 2
    assert "lrn" in kinds and "max_pool2d" in kinds and "relu" in kinds
    rows = net.summary(print_fn=None)
    conv_macs = sum(r["macs"] for r in rows if r["kind"] == "conv2d")
    assert conv_macs > 0.9 * sum(r["macs"] for r in rows)   # the conv layers dominate


def test_regression_guard_matches_training_tool_logits(net):
    """Seeded synthetic images: npconv's float64 forward equals PyTorch's float64 logits stored at export."""
    with np.load(os.path.join(HERE, "data", "reference_guard.npz"), allow_pickle=False) as z:
        x, ref = z["x"], z["logits"]
    out = net.forward(x)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)
    out32 = net.forward(x.astype(np.float32))
    np.testing.assert_allclose(out32, ref, rtol=1e-3, atol=1e-3)
    assert (out32.argmax(1) == ref.argmax(1)).all()


@pytest.mark.data
def test_agreement_with_training_tool_on_the_whole_test_split(net):
    from npconv.datasets import load_cifar10
    X, y = load_cifar10("test")
    ref = np.load(os.path.join(HERE, "data", "reference_torch_test_logits.npy"), allow_pickle=False)
    out = net.predict(X, batch_size=500, dtype=np.float64)
    assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0           # 100% agreement in float64
    assert np.abs(out - ref).max() < 1e-8
    top1 = (out.argmax(1) == y).mean()
    assert abs(top1 - net.meta["test_top1_training_tool"]) < 1e-12
