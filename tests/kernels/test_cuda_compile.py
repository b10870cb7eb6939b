"""Every kernel source compiles with NVRTC exactly as cupy.RawModule compiles it (no GPU needed), for sm_75,
sm_80 and sm_90, in both dtype specialisations, with every warning an error; registers and spills are reported.

Run with ``-s`` (or ``-rP``) to see the per-kernel register/spill table.
"""
from __future__ import annotations

import numpy as np
import pytest
from nvrtc_tools import ARCHS, compile_source, nvrtc_compile, ptxas_report, rawmodule_options

from npconv.kernels.cuda import loader, ops

pytestmark = pytest.mark.nvrtc
SOURCES = loader.source_names()
DTYPE_NAMES = ("float32", "float64")


def kernels_of(source, dtype_name):
    return {loader.kernel_name(k, dtype_name) for k, (src, _) in ops.LAUNCH_SIGNATURES.items() if src == source}


def test_every_source_is_used_by_ops():
    assert set(SOURCES) == {src for src, _ in ops.LAUNCH_SIGNATURES.values()}


def test_every_cuda_file_is_checked():
    """Every .cu file of the package is a source of ops.py (compiled by this file), the prelude, or the source of a
    launch module with its own NVRTC and PTX checks (test_cuda_lowrank_nvrtc.py, test_cuda_bicluster_nvrtc.py)."""
    from importlib import resources

    from npconv.kernels.cuda import ops_bicluster, ops_lowrank
    files = {p.name[:-3] for p in resources.files(loader.__package__).iterdir() if p.name.endswith(".cu")}
    assert files == set(SOURCES) | {"_prelude", ops_lowrank.SOURCE, ops_bicluster.SOURCE}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("source", SOURCES)
def test_source_compiles(source, dtype_name, arch):
    cubin, log = compile_source(source, dtype_name, arch)
    assert cubin[:4] == b"\x7fELF"
    report = ptxas_report(log)
    assert kernels_of(source, dtype_name) <= set(report), f"entry points missing from the cubin: {sorted(report)}"


def test_no_kernel_spills_registers():
    """ptxas -v for every kernel and architecture: no spill stores or loads, no stack frame."""
    rows, bad = [], []
    for source in SOURCES:
        for dtype_name in DTYPE_NAMES:
            for arch in ARCHS:
                for name, r in sorted(ptxas_report(compile_source(source, dtype_name, arch)[1]).items()):
                    rows.append(f"sm_{arch}  {name:32s} regs {r.get('registers', '-'):>3}  smem {r.get('smem', 0):>5}"
                                f"  stack {r['stack']:>3}  spill st/ld {r['spill_stores']}/{r['spill_loads']}")
                    if r["spill_stores"] or r["spill_loads"] or r["stack"]:
                        bad.append(rows[-1])
    print("\n" + "\n".join(rows))
    assert not bad, "kernels that spill:\n" + "\n".join(bad)


def test_options_are_those_cupy_rawmodule_uses(monkeypatch):
    """Run CuPy's own compile path (core.compile_with_cache, as RawModule calls it) up to the NVRTC call and
    check the options it hands NVRTC are exactly ``rawmodule_options``."""
    from cupy._core import core
    from cupy.cuda import compiler

    code = loader.source_text("elementwise", np.float32)
    seen = []

    class Stop(Exception):
        pass

    class Spy(compiler._NVRTCProgram):
        def __init__(self, src, *args, **kwargs):
            self.spy_src = src
            super().__init__(src, *args, **kwargs)

        def compile(self, options=(), log_stream=None):
            if self.spy_src == code:
                seen.append(tuple(options))
                raise Stop
            return super().compile(options, log_stream)

    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")          # never answer from CuPy's on-disk kernel cache
    monkeypatch.setattr(compiler, "_NVRTCProgram", Spy)
    # the real function asks the device for its compute capability; the arch is given here
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    with pytest.raises(Stop):
        core.compile_with_cache(code, loader.RAWMODULE_OPTIONS, "90", prepend_cupy_headers=False)
    assert seen == [rawmodule_options("90")]


@pytest.mark.parametrize("body,message", [
    # NVRTC has no <cfloat>: the reason kernels use npc_neg_inf()
    ("y[0] = -FLT_MAX;", "FLT_MAX"),
    # a warning (unused variable) is an error under -Werror=all-warnings
    ("int unused = 3; y[0] = 1;", "unused"),
    ("int* p = y; p[0] = 1;", "cannot be used to initialize"),
])
def test_broken_source_is_rejected(body, message):
    from cupy.cuda.compiler import CompileException
    code = loader.source_text("elementwise", np.float32) + f"\nNPCONV_KERNEL(broken)(real_t* y) {{ {body} }}\n"
    with pytest.raises(CompileException, match=message):
        nvrtc_compile(code, "90")


def test_loader_source_text():
    text = loader.source_text("pool", np.float64)
    assert text.startswith("#define NPCONV_REAL double\n#define NPCONV_SFX f64\n")
    assert loader.kernel_name("im2col", np.float32) == "npconv_im2col_f32"
    with pytest.raises(TypeError, match="float32 or float64"):
        loader.kernel_name("im2col", np.float16)
    with pytest.raises(ValueError, match="no CUDA source 'nope'"):
        loader.source_text("nope", np.float32)
