"""The checks of ``_lowrank.cu`` that are its own (no GPU needed): the constants it shares with ops_lowrank, a wrong
launch-table declaration caught by the PTX, and every entry point of ops_lowrank driven through a CuPy stand-in whose
kernels only record their arguments, each launch's packed sizes checked against the PTX. The compile (sm_75/80/90,
warnings as errors, no spills; run with ``-s`` for the registers) and the declared launch table are checked with
the other private source in test_cuda_private_nvrtc.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from nvrtc_tools import check_launch_log, declared_sizes, ptx_entries, ptx_of_source
from test_cuda_ptx_signatures import cupy_packed_size, recording_cupy  # noqa: F401  (a fixture)

from npconv.kernels.cuda import loader, ops_lowrank

pytestmark = pytest.mark.nvrtc
DTYPE_NAMES = ("float32", "float64")


def test_constants_shared_with_the_source():
    text = ops_lowrank.source_text(np.float32)
    assert int(re.search(r"#define NPCONV_MONO_FT (\d+)", text)[1]) == ops_lowrank.MONO_FILTERS_PER_PASS
    assert int(re.search(r"#define NPCONV_MONO_RX (\d+)", text)[1]) == ops_lowrank.MONO_COLS_PER_THREAD
    assert int(re.search(r"#define NPCONV_MONO_RY (\d+)", text)[1]) == ops_lowrank.MONO_ROWS_PER_THREAD
    assert int(re.search(r"#define NPCONV_FACTOR_FT (\d+)", text)[1]) == ops_lowrank.FACTOR_FILTERS_PER_BLOCK
    # the launch bound (threads, blocks per SM) and the block widths the kernel is compiled for
    assert re.search(r"#define NPCONV_MONO_BOUNDS (\d+), 2\n", text)[1] == str(ops_lowrank.MONO_MAX_THREADS)
    assert re.search(r"NPCONV_KERNEL_LB\(mono_conv, NPCONV_MONO_BOUNDS\)", text)
    assert set(map(int, re.findall(r"npc_mono_passes<(\d+)>\(", text))) == set(ops_lowrank.MONO_TILE_WIDTHS)
    # the widest pass is the weight buffer's width; the pass widths the kernel picks from
    assert set(map(int, re.findall(r"npc_mono_pass<(\d+), \d+, TW>\(", text))) == {8, 4, 2}
    # a colour's share: a multiple of the kernel's granule (whole 8- and 4-filter passes)
    granule = int(re.search(r"#define NPCONV_MONO_SHARE (\d+)", text)[1])
    assert granule == 4 and ops_lowrank.MONO_SHARE_FILTERS % granule == 0
    # lr_expand<TB>: the compiled ranks and the pixels a thread of each
    found = {int(tb): int(pix) for tb, pix in re.findall(r"^NPCONV_LR_EXPAND\((\d+), (\d+)\)$", text, re.M)}
    assert found == ops_lowrank.LR_EXPAND_RANKS
    assert re.search(r"NPCONV_KERNEL_LB\(lr_expand##TB, 256\)", text) and ops_lowrank._BLOCK <= 256
    # lr_conv<TB>: the same ranks, its launch bound and the loads a thread issues ahead
    convs = re.findall(r"^NPCONV_LR_CONV\((\d+), (\d), (lr_conv\w+)\)$", text, re.M)
    assert {(int(tb), name) for tb, pix, name in convs if pix == "1"} == {
        (tb, f"lr_conv{tb}") for tb in ops_lowrank.LR_EXPAND_RANKS}
    assert {(int(tb), name) for tb, pix, name in convs if pix == "2"} == {
        (tb, f"lr_conv{tb}_px2") for tb in ops_lowrank.LR_CONV_PX2_RANKS}
    assert re.search(r"NPCONV_KERNEL_LB_MIN\(NAME, 256, 2\)", text) and ops_lowrank.LR_CONV_THREADS <= 256
    assert int(re.search(r"#define NPCONV_LRC_UNROLL (\d+)", text)[1]) == ops_lowrank.LR_CONV_UNROLL
    # sep_conv<KB>: the compiled ranks, the tile's columns and the filters of a horizontal pass, its launch bound
    assert set(map(int, re.findall(r"^NPCONV_SEP_CONV\((\d+)\)$", text, re.M))) == set(ops_lowrank.SEP_CONV_RANKS)
    assert int(re.search(r"#define NPCONV_SEP_TC (\d+)", text)[1]) == ops_lowrank.SEP_TILE_COLS
    assert int(re.search(r"#define NPCONV_SEP_FT (\d+)", text)[1]) == ops_lowrank.SEP_FILTERS_PER_PASS
    assert re.search(r"NPCONV_KERNEL_LB_MIN\(sep_conv##KB, 256, 2\)", text)
    assert max(ops_lowrank.SEP_TILE_ROWS) * ops_lowrank.SEP_TILE_COLS <= 256


def test_a_wrong_declaration_is_caught():
    source, kinds = ops_lowrank.LAUNCH_SIGNATURES["mono_conv"]
    wrong = kinds[:3] + ("i32",) + kinds[4:]                    # order declared an int, the kernel takes int*
    ptx = ptx_entries(ptx_of_source(ops_lowrank.SOURCE, "float32"))
    assert ptx["npconv_mono_conv_f32"] != declared_sizes(wrong, np.float32)


@pytest.fixture
def recording(recording_cupy):  # noqa: F811  (the imported fixture)
    ops_lowrank.clear_cache()
    yield recording_cupy
    ops_lowrank.clear_cache()


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_every_launch_matches_ptx(recording, rng, monkeypatch, dtype_name):
    """Drive every entry point (and the fallbacks into ops.py); every launch's packed sizes equal the PTX's."""
    cp, log = recording
    dt = np.dtype(dtype_name)

    def a(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(dt))
    asg = np.array([0, 2, 2, 0])
    ops_lowrank.monochromatic_conv2d(a(2, 3, 9, 9), a(3, 3), asg, a(4, 3, 3), a(4), stride=(2, 1),
                                     padding=(1, 1, 0, 0))
    ops_lowrank.monochromatic_conv2d(a(1, 3, 9, 9), a(3, 3), asg, a(4, 3, 3), None, stride=(1, 1),
                                     padding=(0, 0, 0, 0))
    for fused, px2 in ((32, 10**9), (32, 0), (0, 0)):   # lr_conv8/16/32, their _px2, then factor_conv + lr_expand
        monkeypatch.setattr(ops_lowrank, "LR_CONV_MAX_RANK", fused)
        monkeypatch.setattr(ops_lowrank, "LR_CONV_PX2_MIN_PIXELS", px2)
        for t in (3, 12, 20, 40):              # rank 40: the GEMM and bias_add
            ops_lowrank.lowrank_conv2d(a(2, 6, 8, 8), a(t, 6, 3, 3), a(5, t), a(5), stride=(1, 1),
                                       padding=(1, 1, 1, 1), dilation=(1, 1))
    ops_lowrank.separable_conv2d(a(2, 3, 8, 8), a(2, 3, 3, 1), a(5, 2, 1, 3), a(5), stride=(2, 2),
                                 padding=(1, 1, 1, 1))
    monkeypatch.setattr(ops_lowrank, "SEP_CONV_MAX_PIXELS", 10**9)
    for K in (2, 6, 12):                       # sep_conv4, 8 and 16
        ops_lowrank.separable_conv2d(a(2, 3, 8, 8), a(K, 3, 3, 1), a(5, K, 1, 3), a(5), stride=(2, 2),
                                     padding=(1, 1, 1, 1))
    monkeypatch.setattr(ops_lowrank, "MONO_SMEM_BUDGET", 8)   # the composed fallback, through ops.conv2d
    ops_lowrank.monochromatic_conv2d(a(1, 3, 9, 9), a(3, 3), asg, a(4, 3, 3), a(4), stride=(1, 1),
                                     padding=(0, 0, 0, 0))
    launched = check_launch_log(log)
    assert {loader.kernel_name(k, dt) for k in ops_lowrank.LAUNCH_SIGNATURES} <= launched
    assert loader.kernel_name("conv_direct", dt) in launched                  # the fallback ran
    assert loader.kernel_name("bias_add", dt) in launched                     # the rank-40 1x1 stage
    assert [cupy_packed_size(v) for v in (np.zeros(2, np.int32), np.int32(1), 1)] == [8, 4, 8]
