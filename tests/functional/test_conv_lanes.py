"""``conv2d(algorithm="lanes")`` (the filters in the vector lanes, ``functional/_lanes.py``) and what
``algorithm="auto"`` sends to it: the whole convolution against the naive loops and PyTorch, chunks of images,
non-contiguous inputs, ``out=``, a layer's kept weights, the "auto" choice and the option's validation."""
import numpy as np
import pytest

import npconv.functional._lanes as LN
from npconv.functional import conv2d
from npconv.functional.conv import auto_algorithm
from npconv.kernels.cpu.conv_lanes import lanes_tile
from npconv.layers import Conv2d
from tests.reference import conv2d_einsum, conv2d_naive, count_calls, tolerance

DTYPES = [np.float32, np.float64]
needs_lanes = pytest.mark.skipif(lanes_tile(np.float32) is None,
                                 reason="the lanes kernel needs AVX-512 (32 vector registers)")


@needs_lanes
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,H,W,F,K,stride,padding,dilation", [
    (1, 6, 11, 13, 40, (5, 5), (2, 2), (0, 0, 0, 0), (1, 1)),       # a ZF conv2-like layer, F across a block edge
    (2, 5, 13, 13, 17, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),       # an AlexNet conv3-like layer
    (3, 4, 9, 20, 33, (2, 4), (1, 3), (0, 1, 2, 0), (2, 1)),        # uneven strides, padding and dilation
    (1, 2, 30, 31, 8, (7, 7), (3, 2), (3, 3, 3, 3), (1, 1)),
    (2, 3, 10, 21, 9, (3, 3), (1, 2), (1, 0, 1, 1), (1, 2)),        # an even dilation over the column phases
])
@pytest.mark.parametrize("bias", [True, False])
def test_lanes_matches_naive_loops(rng, dtype, N, C, H, W, F, K, stride, padding, dilation, bias):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C) + K).astype(dtype)
    b = rng.standard_normal(F).astype(dtype) if bias else None
    y = conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, algorithm="lanes")
    assert y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, stride, padding, dilation), *tolerance(dtype))


@needs_lanes
@pytest.mark.parametrize("dtype", DTYPES)
def test_lanes_chunks_of_images_and_out(rng, monkeypatch, dtype):
    # a batch in chunks of one or two images (their input planes over CHUNK_BYTES), written into a given out
    x = rng.standard_normal((5, 7, 12, 12)).astype(dtype)
    w = rng.standard_normal((20, 7, 3, 3)).astype(dtype)
    b = rng.standard_normal(20).astype(dtype)
    want = conv2d_einsum(x, w, b, (1, 1), (1, 1, 1, 1))
    for images in (1, 2):
        monkeypatch.setattr(LN, "CHUNK_BYTES", images * 7 * 14 * 14 * x.itemsize + 1)
        out = np.full((5, 20, 12, 12), np.nan, dtype)
        assert conv2d(x, w, b, padding=1, algorithm="lanes", out=out) is out
        np.testing.assert_allclose(out, want, *tolerance(dtype))


@needs_lanes
@pytest.mark.parametrize("dtype", DTYPES)
def test_lanes_non_contiguous_inputs(rng, dtype):
    big = rng.standard_normal((3, 8, 12, 14)).astype(dtype)
    x = big[:, ::2, 1:, ::-1]                        # strided, offset, reversed
    w = np.asfortranarray(rng.standard_normal((5, 4, 3, 2)).astype(dtype))
    b = rng.standard_normal(10).astype(dtype)[::2]
    y = conv2d(x, w, b, stride=(2, 1), padding=(1, 0), algorithm="lanes")
    np.testing.assert_allclose(y, conv2d_naive(x, w, b, (2, 1), (1, 1, 0, 0)), *tolerance(dtype))


@needs_lanes
@pytest.mark.parametrize("stride,padding", [(10**6, 0), ((1, 10**6), 1), ((9, 4), (0, 3))])
def test_lanes_stride_beyond_the_input(rng, stride, padding):
    x = rng.standard_normal((2, 3, 9, 9))
    w = rng.standard_normal((4, 3, 3, 3))
    y = conv2d(x, w, stride=stride, padding=padding, algorithm="lanes")
    s = stride if isinstance(stride, tuple) else (stride, stride)
    p = padding if isinstance(padding, tuple) else (padding, padding)
    np.testing.assert_allclose(y, conv2d_naive(x, w, None, s, (p[0], p[0], p[1], p[1])), *tolerance(np.float64))


@needs_lanes
def test_layer_keeps_the_packed_weights_until_they_change(rng, monkeypatch):
    from npconv.kernels.cpu import gemm as KG
    x = rng.standard_normal((1, 64, 13, 13)).astype(np.float32)
    w = rng.standard_normal((40, 64, 3, 3)).astype(np.float32)
    layer = Conv2d(w, padding=1)
    assert auto_algorithm(x.shape, w.shape, (1, 1), (1, 1), 1, (13, 13), dtype=np.float32) == "lanes"
    packs = count_calls(monkeypatch, KG, "pack_a")
    y1 = layer(x)
    layer(x)
    assert len(packs) == 1                        # packed once, kept by the layer
    np.testing.assert_allclose(y1, conv2d_einsum(x, w, None, (1, 1), (1, 1, 1, 1)), *tolerance(np.float32))
    layer.params["weight"] = -w
    layer._sync_params()
    np.testing.assert_allclose(layer(x), -y1, rtol=1e-6, atol=1e-5)
    assert len(packs) == 2


@needs_lanes
def test_auto_takes_lanes_for_deep_layers():
    one = ((1, 1), (1, 1), 1)
    f32 = dict(dtype=np.float32)
    assert auto_algorithm((1, 96, 55, 55), (256, 96, 5, 5), (2, 2), (1, 1), 1, (26, 26), **f32) == "lanes"  # ZF conv2
    assert auto_algorithm((128, 96, 55, 55), (256, 96, 5, 5), (2, 2), (1, 1), 1, (26, 26), **f32) == "lanes"
    assert auto_algorithm((8, 64, 32, 32), (64, 64, 3, 3), *one, (32, 32), **f32) == "lanes"
    assert auto_algorithm((1, 64, 32, 32), (64, 64, 3, 3), *one, (32, 32), dtype=np.float64) == "lanes"
    assert auto_algorithm((1, 256, 5, 5), (256, 256, 3, 3), *one, (5, 5), **f32) == "lanes"      # 9 tiles
    # Winograd where it is faster still: 128 channels or more and 32 tiles
    assert auto_algorithm((1, 256, 13, 13), (384, 256, 3, 3), *one, (13, 13), **f32) == "winograd"  # 49 tiles
    assert auto_algorithm((8, 256, 13, 13), (384, 256, 3, 3), *one, (13, 13), **f32) == "winograd"
    assert auto_algorithm((1, 128, 16, 16), (128, 128, 3, 3), *one, (16, 16), **f32) == "winograd"
    # few taps per output (a first layer), 1x1 kernels and grouped convs: not lanes
    assert auto_algorithm((1, 3, 224, 224), (96, 3, 7, 7), (2, 2), (1, 1), 1, (110, 110), **f32) == "gemm"
    assert auto_algorithm((1, 512, 14, 14), (256, 512, 1, 1), *one, (14, 14), **f32) == "gemm"
    assert auto_algorithm((1, 64, 14, 14), (64, 32, 3, 3), (1, 1), (1, 1), 2, (14, 14), **f32) == "gemm"


def test_auto_without_the_lanes_tile_keeps_the_other_algorithms(monkeypatch):
    # on a CPU without AVX-512 the lanes kernel is never chosen
    monkeypatch.setattr(LN, "lanes_eligible", lambda dtype, groups: False)
    one = ((1, 1), (1, 1), 1)
    assert auto_algorithm((1, 96, 55, 55), (256, 96, 5, 5), (2, 2), (1, 1), 1, (26, 26)) == "gemm"
    assert auto_algorithm((8, 64, 32, 32), (64, 64, 3, 3), *one, (32, 32)) == "winograd"


@pytest.mark.torch
@needs_lanes
@pytest.mark.parametrize("dtype", DTYPES)
def test_lanes_matches_torch(rng, dtype):
    import torch
    x = rng.standard_normal((2, 24, 27, 27)).astype(dtype)
    w = rng.standard_normal((48, 24, 5, 5)).astype(dtype)
    b = rng.standard_normal(48).astype(dtype)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=2,
                                     padding=2).numpy()
    np.testing.assert_allclose(conv2d(x, w, b, stride=2, padding=2, algorithm="lanes"), ref,
                               *(np.array(tolerance(dtype)) * 10))


def test_lanes_refuses_groups(rng):
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r'algorithm="lanes" needs groups=1 .* got groups 2'):
        conv2d(x, w, groups=2, algorithm="lanes")


@pytest.mark.skipif(lanes_tile(np.float32) is not None, reason="this CPU has the lanes tile")
def test_lanes_refuses_a_cpu_without_avx512(rng):
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"this CPU has no AVX-512"):
        conv2d(x, w, algorithm="lanes")
