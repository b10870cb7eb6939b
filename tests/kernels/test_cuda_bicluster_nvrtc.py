"""``_bicluster.cu`` compiled with NVRTC exactly as cupy.RawModule compiles it (no GPU needed): sm_75/80/90, both
dtypes, every warning an error, no register spills and no stack frame; its launch table checked against the PTX,
both as declared (ops_bicluster.LAUNCH_SIGNATURES) and as actually passed by every entry point of ops_bicluster
(recorded through a CuPy stand-in whose kernels only record their arguments). Reuses the helpers of
test_cuda_compile.py and test_cuda_ptx_signatures.py.

Run with ``-s`` to see the registers per kernel and architecture.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from bicluster_reference import make_factors
from nvrtc_tools import ARCHS, nvrtc_compile, ptx_entries, ptxas_report
from test_cuda_ptx_signatures import cupy_packed_size, recording_cupy  # noqa: F401  (a fixture)

from npconv.kernels.cuda import loader, ops, ops_bicluster, ops_lowrank

pytestmark = pytest.mark.nvrtc
DTYPE_NAMES = ("float32", "float64")


@functools.lru_cache(maxsize=None)
def compiled(dtype_name, arch):
    return nvrtc_compile(ops_bicluster.source_text(np.dtype(dtype_name)), arch, filename="_bicluster.cu")


@functools.lru_cache(maxsize=None)
def entries(dtype_name):
    ptx = nvrtc_compile(ops_bicluster.source_text(np.dtype(dtype_name)), "90", ptx=True,
                        extra=("-Werror=all-warnings",), filename="_bicluster.cu")[0]
    return ptx_entries(ptx)


def declared_sizes(kinds, dtype):
    return [{"ptr": 8, "iptr": 8, "i32": 4, "real": np.dtype(dtype).itemsize}[k] for k in kinds]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_source_compiles_without_spills(dtype_name, arch):
    cubin, log = compiled(dtype_name, arch)
    assert cubin[:4] == b"\x7fELF"
    report = ptxas_report(log)
    want = {loader.kernel_name(k, dtype_name) for k in ops_bicluster.LAUNCH_SIGNATURES}
    assert set(report) == want, f"entry points in the cubin: {sorted(report)}"
    rows = [f"sm_{arch} {n:32s} regs {r['registers']:>3} stack {r['stack']} spill {r['spill_stores']}/"
            f"{r['spill_loads']}" for n, r in sorted(report.items())]
    print("\n" + "\n".join(rows))
    assert all(not (r["stack"] or r["spill_stores"] or r["spill_loads"]) for r in report.values()), rows


def test_source_is_built_like_the_package_sources():
    """Same two #define lines and prelude as loader.source_text, and kept out of the other launch tables."""
    ours = ops_bicluster.source_text(np.float32)
    theirs = loader.source_text("elementwise", np.float32)
    head = theirs[:theirs.index('#line 1 "elementwise.cu"')]
    assert ours.startswith(head) and '#line 1 "_bicluster.cu"' in ours
    assert ops_bicluster.SOURCE not in loader.source_names()
    assert not set(ops_bicluster.LAUNCH_SIGNATURES) & (set(ops.LAUNCH_SIGNATURES) | set(ops_lowrank.LAUNCH_SIGNATURES))
    with pytest.raises(TypeError, match="float32 or float64"):
        ops_bicluster.source_text(np.float16)


def test_constants_shared_with_the_source():
    text = ops_bicluster.source_text(np.float32)
    assert int(re.search(r"#define NPCONV_BIC_KC (\d+)", text)[1]) == ops_bicluster.CP_COMPONENTS_PER_BLOCK
    assert int(re.search(r"#define NPCONV_BIC_FT (\d+)", text)[1]) == ops_bicluster.SVD_FILTERS_PER_BLOCK
    for name in ("bic_cp_front", "bic_shared_filter"):          # 2-D tiles of TILE_W x up to max(TILE_ROWS) threads
        assert re.search(rf"NPCONV_KERNEL_LB\({name}, 256\)", text)
    assert ops_bicluster.TILE_W * max(ops_bicluster.TILE_ROWS) <= 256
    assert re.search(r"NPCONV_KERNEL_LB\(bic_svd_spatial, 256\)", text) and ops_bicluster._BLOCK <= 256


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_launch_table_matches_ptx(dtype_name):
    found = entries(dtype_name)
    assert set(found) == {loader.kernel_name(k, dtype_name) for k in ops_bicluster.LAUNCH_SIGNATURES}
    for name, (source, kinds) in ops_bicluster.LAUNCH_SIGNATURES.items():
        assert source == ops_bicluster.SOURCE
        assert found[loader.kernel_name(name, dtype_name)] == declared_sizes(kinds, dtype_name), name


def test_a_wrong_declaration_is_caught():
    source, kinds = ops_bicluster.LAUNCH_SIGNATURES["bic_scatter"]
    wrong = kinds[:1] + ("i32",) + kinds[2:]                    # out_perm declared an int, the kernel takes int*
    assert entries("float32")["npconv_bic_scatter_f32"] != declared_sizes(wrong, np.float32)


@pytest.fixture
def recording(recording_cupy):  # noqa: F811  (the imported fixture)
    ops_bicluster.clear_cache()
    yield recording_cupy
    ops_bicluster.clear_cache()


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_every_launch_matches_ptx(recording, rng, dtype_name):
    """Drive every entry point; every launch's packed sizes equal the PTX parameter sizes."""
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
    launched = set()
    ptx_cache = {}
    for code, name, sizes in log:
        if code not in ptx_cache:
            ptx_cache[code] = ptx_entries(nvrtc_compile(code, "90", ptx=True, extra=())[0])
        assert name in ptx_cache[code], f"launched {name}, which its module does not define"
        assert sizes == ptx_cache[code][name], f"{name}: passed {sizes} bytes, PTX parameters {ptx_cache[code][name]}"
        launched.add(name)
    assert launched == {loader.kernel_name(k, dt) for k in ops_bicluster.LAUNCH_SIGNATURES}
    assert [cupy_packed_size(v) for v in (np.zeros(2, np.int32), np.int32(1), 1)] == [8, 4, 8]
