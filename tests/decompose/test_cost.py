"""Cost model against hand-computed counts for ZF conv1 / conv2 (the paper's section 4.3 examples)."""
import pytest

from npconv.decompose import cost

# ZF conv1: 3 -> 96, 7x7, stride 2, padding 1, 224x224 -> 110x110; conv2: 96 -> 256, 5x5, stride 2, 55x55 -> 26x26
C1 = dict(in_shape=(3, 224, 224), out_channels=96, kernel_size=7, stride=2, padding=1)
C2 = dict(in_shape=(96, 55, 55), out_channels=256, kernel_size=5, stride=2, padding=0)
NM1, NM2 = 224 * 224, 55 * 55


def test_dense():
    assert cost.conv2d_cost(**C1).macs == 96 * 3 * 49 * 110 * 110
    assert cost.conv2d_cost(**C1).params == 96 * 3 * 49
    assert cost.conv2d_cost(**C1, bias=True).params == 96 * 3 * 49 + 96
    assert cost.conv2d_cost(**C1, form="paper").macs == pytest.approx(3 * 49 * 96 * NM1 / 4)
    assert cost.conv2d_cost(**C2).macs == 256 * 96 * 25 * 26 * 26
    assert cost.linear_cost(4096, 1000).macs == 4096000
    assert cost.linear_cost(10, 5, bias=True).params == 55
    assert cost.svd_linear_cost(4096, 1000, 100) == cost.Cost(100 * 5096, 100 * 5096)


@pytest.mark.parametrize("colors", [4, 6, 8, 12, 24])
def test_monochromatic_conv1(colors):
    paper = cost.monochromatic_cost(**C1, colors=colors, form="paper")
    assert paper.macs == pytest.approx(3 * colors * NM1 + 49 * 96 * NM1 / 4)
    exact = cost.monochromatic_cost(**C1, colors=colors)
    assert exact.macs == 3 * colors * NM1 + 49 * 96 * 110 * 110
    assert exact.params == colors * 3 + 96 * 49
    g = cost.gain(cost.conv2d_cost(**C1, form="paper"), paper)
    assert g == pytest.approx(3 * 49 * 96 / 4 / (3 * colors + 49 * 96 / 4))
    assert 2.8 < g < 2.98


def test_monochromatic_gain_c6():
    g = cost.gain(cost.conv2d_cost(**C1, form="paper"), cost.monochromatic_cost(**C1, colors=6, form="paper"))
    assert g == pytest.approx(3528 / 1194)           # about 2.95
    assert round(g, 2) == 2.95


def test_bicluster_cp_conv2():
    paper = cost.bicluster_cp_cost(**C2, in_groups=48, out_groups=2, rank=8, form="paper")
    assert paper.macs == pytest.approx(48 * 2 * 8 * (NM2 * 2 + 25 * NM2 / 4 + 128 * NM2 / 4))
    g = cost.gain(cost.conv2d_cost(**C2, form="paper"), paper)
    assert g == pytest.approx(153600 / 30912) and 4.9 < g < 5.0
    exact = cost.bicluster_cp_cost(**C2, in_groups=48, out_groups=2, rank=8)
    assert exact.macs == 96 * 8 * (NM2 * 2 + 5 * 26 * 55 + 5 * 26 * 26 + 128 * 26 * 26)
    assert exact.params == 96 * 8 * (2 + 5 + 5 + 128)
    full = cost.bicluster_cp_cost(**C2, in_groups=48, out_groups=2, rank=8, separable=False)
    assert full.macs == 96 * 8 * (NM2 * 2 + 25 * 26 * 26 + 128 * 26 * 26)


def test_bicluster_svd():
    c = cost.bicluster_svd_cost(**C2, in_groups=48, out_groups=2, ranks=(5, 20))
    per = NM2 * 2 * 5 + 26 * 26 * 25 * 5 * 20 + 26 * 26 * 20 * 128
    assert c.macs == 96 * per
    assert c.params == 96 * (2 * 5 + 25 * 100 + 20 * 128)
    p = cost.bicluster_svd_cost(**C2, in_groups=48, out_groups=2, ranks=(5, 20), form="paper")
    assert p.macs == pytest.approx(96 * (NM2 * 2 * 5 + NM2 / 4 * 25 * 100 + NM2 / 4 * 20 * 128))


def test_separable_and_lowrank_conv():
    s = cost.separable_cost(**C1, rank=8)
    assert s.macs == 8 * 3 * 7 * 110 * 224 + 96 * 8 * 7 * 110 * 110
    assert s.params == 8 * 3 * 7 + 96 * 8 * 7
    assert cost.separable_cost(**C1, rank=8, form="paper").macs == pytest.approx(
        8 * 3 * 7 * NM1 / 2 + 96 * 8 * 7 * NM1 / 4)
    lr = cost.conv_svd_cost(**C1, rank=16)
    assert lr.macs == (16 * 147 + 96 * 16) * 110 * 110
    sh = cost.shared_separable_cost(**C2, in_groups=48, out_groups=2, rank=6, n_filters=4)
    # every input channel through 4 shared filters (vertical over the 55-wide input, then horizontal), the
    # 1x1 combination into H*K = 12 components per group, and the expansion summing G*K = 288 per output
    assert sh.macs == 96 * 4 * (5 * 26 * 55 + 5 * 26 * 26) + 96 * 2 * 6 * 676 + 256 * 48 * 6 * 676
    assert sh.params == 96 * 2 * 6 + 4 * 10 + 256 * 48 * 6
    few = cost.shared_separable_cost(**C2, in_groups=48, out_groups=2, rank=6, n_filters=4, filters_used=[1] * 48)
    assert few.macs == 96 * 1 * (5 * 26 * 55 + 5 * 26 * 26) + 96 * 2 * 6 * 676 + 256 * 48 * 6 * 676


def test_cost_errors():
    with pytest.raises(ValueError, match="in_groups"):
        cost.bicluster_cp_cost(**C2, in_groups=5, out_groups=2, rank=8)
    with pytest.raises(ValueError, match="out_groups"):
        cost.bicluster_svd_cost(**C2, in_groups=48, out_groups=3, ranks=(1, 1))
    with pytest.raises(ValueError, match="ranks"):
        cost.bicluster_svd_cost(**C2, in_groups=48, out_groups=2, ranks=5)
    with pytest.raises(ValueError, match="form"):
        cost.conv2d_cost(**C1, form="approx")
    with pytest.raises(ValueError, match="in_shape"):
        cost.conv2d_cost((3, 224), 96, 7)
    with pytest.raises(ValueError, match="output"):
        cost.conv2d_cost((3, 4, 4), 8, 7)
    with pytest.raises(TypeError):
        cost.gain(1.0, cost.Cost(1, 1))
    with pytest.raises(ValueError):
        cost.gain(cost.Cost(1, 1), cost.Cost(0, 1))
    assert cost.param_gain(cost.Cost(1, 10), cost.Cost(1, 5)) == 2.0
    assert cost.Cost(1, 2) + cost.Cost(3, 4) == cost.Cost(4, 6)
