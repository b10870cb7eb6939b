"""``_lowrank.cu`` compiled with NVRTC exactly as cupy.RawModule compiles it (no GPU needed): sm_75/80/90, both
dtypes, every warning an error, no register spills; and its launch table checked against the PTX, both as declared
(ops_lowrank.LAUNCH_SIGNATURES) and as actually passed by every entry point of ops_lowrank (recorded through a
CuPy stand-in whose kernels only record their arguments). Reuses the helpers of test_cuda_compile.py and
test_cuda_ptx_signatures.py.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from nvrtc_tools import ARCHS, nvrtc_compile, ptx_entries, ptxas_report
from test_cuda_ptx_signatures import cupy_packed_size, recording_cupy  # noqa: F401  (a fixture)

from npconv.kernels.cuda import loader, ops, ops_lowrank

pytestmark = pytest.mark.nvrtc
DTYPE_NAMES = ("float32", "float64")


@functools.lru_cache(maxsize=None)
def compiled(dtype_name, arch):
    return nvrtc_compile(ops_lowrank.source_text(np.dtype(dtype_name)), arch, filename="_lowrank.cu")


@functools.lru_cache(maxsize=None)
def entries(dtype_name):
    ptx = nvrtc_compile(ops_lowrank.source_text(np.dtype(dtype_name)), "90", ptx=True,
                        extra=("-Werror=all-warnings",), filename="_lowrank.cu")[0]
    return ptx_entries(ptx)


def declared_sizes(kinds, dtype):
    return [{"ptr": 8, "iptr": 8, "i32": 4, "real": np.dtype(dtype).itemsize}[k] for k in kinds]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_source_compiles_without_spills(dtype_name, arch):
    cubin, log = compiled(dtype_name, arch)
    assert cubin[:4] == b"\x7fELF"
    report = ptxas_report(log)
    want = {loader.kernel_name(k, dtype_name) for k in ops_lowrank.LAUNCH_SIGNATURES}
    assert set(report) == want, f"entry points in the cubin: {sorted(report)}"
    rows = [f"sm_{arch} {n:28s} regs {r['registers']:>3} stack {r['stack']} spill {r['spill_stores']}/"
            f"{r['spill_loads']}" for n, r in sorted(report.items())]
    print("\n" + "\n".join(rows))
    assert all(not (r["stack"] or r["spill_stores"] or r["spill_loads"]) for r in report.values()), rows


def test_source_is_built_like_the_package_sources():
    """Same two #define lines and prelude as loader.source_text, and kept out of ops.py's sources."""
    ours = ops_lowrank.source_text(np.float64)
    theirs = loader.source_text("elementwise", np.float64)
    head = theirs[:theirs.index('#line 1 "elementwise.cu"')]
    assert ours.startswith(head) and '#line 1 "_lowrank.cu"' in ours
    assert ops_lowrank.SOURCE not in loader.source_names()
    assert not set(ops_lowrank.LAUNCH_SIGNATURES) & set(ops.LAUNCH_SIGNATURES)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops_lowrank.source_text(np.float16)


def test_constants_shared_with_the_source():
    text = ops_lowrank.source_text(np.float32)
    assert int(re.search(r"#define NPCONV_MONO_FT (\d+)", text)[1]) == ops_lowrank.MONO_FILTERS_PER_PASS
    assert int(re.search(r"#define NPCONV_FACTOR_FT (\d+)", text)[1]) == ops_lowrank.FACTOR_FILTERS_PER_BLOCK
    assert re.search(r"NPCONV_KERNEL_LB\(mono_conv, 256\)", text) and ops_lowrank.MONO_TILE_W * max(
        ops_lowrank.MONO_TILE_ROWS) <= 256


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_launch_table_matches_ptx(dtype_name):
    found = entries(dtype_name)
    assert set(found) == {loader.kernel_name(k, dtype_name) for k in ops_lowrank.LAUNCH_SIGNATURES}
    for name, (source, kinds) in ops_lowrank.LAUNCH_SIGNATURES.items():
        assert source == ops_lowrank.SOURCE
        assert found[loader.kernel_name(name, dtype_name)] == declared_sizes(kinds, dtype_name), name


def test_a_wrong_declaration_is_caught():
    source, kinds = ops_lowrank.LAUNCH_SIGNATURES["mono_conv"]
    wrong = kinds[:3] + ("i32",) + kinds[4:]                    # order declared an int, the kernel takes int*
    assert entries("float32")["npconv_mono_conv_f32"] != declared_sizes(wrong, np.float32)


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
    ops_lowrank.lowrank_conv2d(a(2, 6, 8, 8), a(3, 6, 3, 3), a(5, 3), a(5), stride=(1, 1), padding=(1, 1, 1, 1),
                               dilation=(1, 1))
    ops_lowrank.separable_conv2d(a(2, 3, 8, 8), a(2, 3, 3, 1), a(5, 2, 1, 3), a(5), stride=(2, 2),
                                 padding=(1, 1, 1, 1))
    monkeypatch.setattr(ops_lowrank, "MONO_SMEM_BUDGET", 8)   # the composed fallback, through ops.conv2d
    ops_lowrank.monochromatic_conv2d(a(1, 3, 9, 9), a(3, 3), asg, a(4, 3, 3), a(4), stride=(1, 1),
                                     padding=(0, 0, 0, 0))
    launched = set()
    ptx_cache = {}
    for code, name, sizes in log:
        if code not in ptx_cache:
            ptx_cache[code] = ptx_entries(nvrtc_compile(code, "90", ptx=True, extra=())[0])
        assert name in ptx_cache[code], f"launched {name}, which its module does not define"
        assert sizes == ptx_cache[code][name], f"{name}: passed {sizes} bytes, PTX parameters {ptx_cache[code][name]}"
        launched.add(name)
    assert {loader.kernel_name(k, dt) for k in ops_lowrank.LAUNCH_SIGNATURES} <= launched
    assert loader.kernel_name("conv_direct", dt) in launched                  # the fallback ran
    assert [cupy_packed_size(v) for v in (np.zeros(2, np.int32), np.int32(1), 1)] == [8, 4, 8]
