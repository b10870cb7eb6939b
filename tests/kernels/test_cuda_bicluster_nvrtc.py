"""The checks of ``_bicluster.cu`` that are its own (no GPU needed): the constants it shares with ops_bicluster, a wrong
launch-table declaration caught by the PTX, and every entry point of ops_bicluster driven through a CuPy stand-in whose
kernels only record their arguments, each launch's packed sizes checked against the PTX. The compile (sm_75/80/90,
warnings as errors, no spills; run with ``-s`` for the registers) and the declared launch table are checked with
the other private source in test_cuda_private_nvrtc.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from bicluster_reference import make_factors
from nvrtc_tools import check_launch_log, declared_sizes, ptx_entries, ptx_of_source
from test_cuda_ptx_signatures import cupy_packed_size, recording_cupy  # noqa: F401  (a fixture)

from npconv.kernels.cuda import loader, ops_bicluster

pytestmark = pytest.mark.nvrtc
DTYPE_NAMES = ("float32", "float64")


def test_constants_shared_with_the_source():
    text = ops_bicluster.source_text(np.float32)
    assert int(re.search(r"#define NPCONV_BIC_TH (\d+)", text)[1]) == ops_bicluster.CP_TILE_ROWS
    assert re.search(rf"NPCONV_KERNEL_LB_MIN\(base, {ops_bicluster.CP_MAX_THREADS}, ", text)   # bic_cp_front*
    entries = set(re.findall(r"NPC_CP_FRONT_KERNEL\((bic_cp_front\w*), (\d+), (\d+)\)", text))
    assert entries == {("bic_cp_front", "0", "0")} | {(ops_bicluster.cp_front_kernel(X, S), str(X), str(S))
                                                      for X, S in ops_bicluster.CP_SPECIALISED}
    assert int(re.search(r"#define NPCONV_BIC_FT (\d+)", text)[1]) == ops_bicluster.SVD_FILTERS_PER_BLOCK
    tile = tuple(int(re.search(rf"#define NPC_TG_{d} (\d+)", text)[1]) for d in ("BM", "BN"))
    assert tile == ops_bicluster.EXPAND_TILE
    assert int(re.search(r"#define NPC_TG_THREADS (\d+)", text)[1]) == ops_bicluster.EXPAND_THREADS
    assert re.search(r"NPCONV_KERNEL_LB\(bic_reduce, NPC_TG_THREADS\)", text)     # launched with EXPAND_THREADS
    assert re.search(r"NPCONV_KERNEL_LB\(bic_shared_filter, 256\)", text)   # TILE_W x up to max(TILE_ROWS)
    assert ops_bicluster.TILE_W * max(ops_bicluster.TILE_ROWS) <= 256
    assert re.search(r"NPCONV_KERNEL_LB\(bic_svd_spatial, 256\)", text) and ops_bicluster._BLOCK <= 256
    assert re.search(r"NPCONV_KERNEL_LB\(bic_svd_spatial_split, 256\)", text)


def test_a_wrong_declaration_is_caught():
    source, kinds = ops_bicluster.LAUNCH_SIGNATURES["bic_scatter"]
    wrong = kinds[:1] + ("i32",) + kinds[2:]                    # out_perm declared an int, the kernel takes int*
    ptx = ptx_entries(ptx_of_source(ops_bicluster.SOURCE, "float32"))
    assert ptx["npconv_bic_scatter_f32"] != declared_sizes(wrong, np.float32)


@pytest.fixture
def recording(recording_cupy):  # noqa: F811  (the imported fixture)
    ops_bicluster.clear_cache()
    yield recording_cupy
    ops_bicluster.clear_cache()


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_every_launch_matches_ptx(recording, monkeypatch, rng, dtype_name):
    """Drive every entry point, the expansion (and the SVD form's reduction) both ways; every launch's packed sizes
    equal the PTX parameter sizes."""
    cp, log = recording
    dt = np.dtype(dtype_name)
    floats = {"cp": (2, 3, 4, 5), "svd": (2, 3, 4), "shared": (2, 4, 5, 6)}
    entry = {"cp": ops_bicluster.bicluster_cp_conv2d, "svd": ops_bicluster.bicluster_svd_conv2d,
             "shared": ops_bicluster.shared_separable_conv2d}
    for kind, ranks in (("cp", 3), ("svd", (2, 3)), ("shared", (2, 3))):
        f = make_factors(kind, rng, dt, 5, 6, 3, 2, (2, 3), (4, 2), ranks)
        args = [cp.asarray(a) if i in floats[kind] else a for i, a in enumerate(f)]
        x = cp.asarray(rng.standard_normal((2, 5, 8, 7)).astype(dt))
        entry[kind](x, *args, cp.asarray(rng.standard_normal(6).astype(dt)), stride=(2, 1), padding=(1, 0, 2, 1))
        entry[kind](x, *args, None, stride=(1, 1), padding=(0, 0, 0, 0))
        with monkeypatch.context() as mp:
            mp.setattr(ops_bicluster, "SHARED_FUSED_MAX_COLUMNS", 1 << 62)   # bic_expand_shared (off by default)
            entry[kind](x, *args, None, stride=(1, 1), padding=(0, 0, 0, 0))
        with monkeypatch.context() as mp:
            mp.setattr(ops_bicluster, "SVD_SPLIT_MAX_BLOCKS", 1 << 62)      # the SVD spatial stage's channel splits
            entry[kind](x, *args, None, stride=(1, 1), padding=(0, 0, 0, 0))
            mp.setattr(ops_bicluster, "SVD_SPLIT_MAX_BLOCKS", 0)
            entry[kind](x, *args, None, stride=(1, 1), padding=(0, 0, 0, 0))
        with monkeypatch.context() as mp:
            mp.setattr(ops_bicluster, "EXPAND_TILED_MAX_COLUMNS", 0)     # a GEMM and a scatter a group
            mp.setattr(ops_bicluster, "REDUCE_TILED_MAX_COLUMNS", 0)     # bic_gather and a GEMM a group
            entry[kind](x, *args, None, stride=(1, 1), padding=(0, 0, 0, 0))
    for X in (4, 5, 7):                 # the CP front end's other entry points (X = 4: the generic one)
        f = make_factors("cp", rng, dt, 5, 6, X, 3, (2, 3), (4, 2), 2)
        args = [cp.asarray(a) if i in floats["cp"] else a for i, a in enumerate(f)]
        x = cp.asarray(rng.standard_normal((1, 5, 12, 9)).astype(dt))
        for s in (1, 2):
            entry["cp"](x, *args, None, stride=(s, 1), padding=(1, 1, 1, 1))
    launched = check_launch_log(log)
    assert launched == {loader.kernel_name(k, dt) for k in ops_bicluster.LAUNCH_SIGNATURES}
    assert [cupy_packed_size(v) for v in (np.zeros(2, np.int32), np.int32(1), 1)] == [8, 4, 8]
