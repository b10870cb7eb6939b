"""Compile kernel sources with NVRTC the way ``cupy.RawModule`` does, without a GPU; read PTX and ptxas output.

CuPy assembles the NVRTC options in three places: ``core.compile_with_cache`` (include paths and
``--std=c++17`` around the user's options, via ``assemble_cupy_compiler_options``), ``_compile_with_cache_cuda``
(``-ftz=true``) and ``compile_using_nvrtc`` (the ``-arch`` option, then ``--device-as-default-execution-space``).
:func:`rawmodule_options` rebuilds that list for a given architecture; the checks then append
``-Werror=all-warnings`` and ``--ptxas-options=-v``, which change no generated code. These are private CuPy
names: setup.cfg pins the CuPy minor version (``npconv[check]``), and test_cuda_compile.py checks the first part
against ``core.compile_with_cache`` itself.
"""
from __future__ import annotations

import functools
import io
import re

import numpy as np

from npconv.kernels.cuda import loader

ARCHS = ("75", "80", "90")
CHECK_OPTIONS = ("-Werror=all-warnings", "--ptxas-options=-v")


def rawmodule_options(arch: str, *, ptx: bool = False) -> tuple[str, ...]:
    from cupy._core import core
    arch_opt = f"-arch=compute_{arch}" if ptx else f"-arch=sm_{arch}"
    return (core.assemble_cupy_compiler_options(tuple(loader.RAWMODULE_OPTIONS))
            + ("-ftz=true", arch_opt, "--device-as-default-execution-space"))


def nvrtc_compile(code: str, arch: str, *, ptx: bool = False, extra=CHECK_OPTIONS, filename="kern.cu"):
    """Compile ``code``; return (cubin or PTX text, the NVRTC/ptxas log). Raises CuPy's CompileException."""
    from cupy.cuda import compiler
    log = io.StringIO()
    prog = compiler._NVRTCProgram(code, filename, method="ptx" if ptx else "cubin")
    out, _ = prog.compile(rawmodule_options(arch, ptx=ptx) + tuple(extra), log)
    if ptx and isinstance(out, bytes):
        out = out.decode()
    return out, log.getvalue()


@functools.lru_cache(maxsize=None)
def compile_source(source: str, dtype_name: str, arch: str):
    """(cubin, log) of a package source for one dtype and architecture, memoized for the session."""
    return nvrtc_compile(loader.source_text(source, np.dtype(dtype_name)), arch, filename=f"{source}.cu")


@functools.lru_cache(maxsize=None)
def ptx_of_source(source: str, dtype_name: str, arch: str = "90") -> str:
    return nvrtc_compile(loader.source_text(source, np.dtype(dtype_name)), arch, ptx=True,
                         extra=("-Werror=all-warnings",), filename=f"{source}.cu")[0]


_FUNC = re.compile(r"Function properties for (\w+)\s*\n\s*ptxas\s*\.\s*(\d+) bytes stack frame, (\d+) bytes spill "
                   r"stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '(\w+)'.*?Used (\d+) registers(?:, used (\d+) barriers)?"
                    r"(?:, (\d+) bytes smem)?", re.S)


def ptxas_report(log: str) -> dict:
    """Per function in a ``--ptxas-options=-v`` log: registers, barriers, static smem, stack, spill bytes."""
    out = {}
    for name, stack, st, ld in _FUNC.findall(log):
        out.setdefault(name, {}).update(stack=int(stack), spill_stores=int(st), spill_loads=int(ld))
    for name, regs, bars, smem in _ENTRY.findall(log):
        out.setdefault(name, {}).update(registers=int(regs), barriers=int(bars or 0), smem=int(smem or 0))
    return out


_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.S)
_PTX_PARAM = re.compile(r"\.param\s+(?:\.align\s+\d+\s+)?\.([a-z]+)(\d+)\s+\w+(?:\[(\d+)\])?")


def ptx_entries(ptx: str) -> dict[str, list[int]]:
    """Kernel name -> parameter sizes in bytes, from the ``.entry`` declarations of a PTX text."""
    return {name: [int(bits) // 8 * int(count or 1) for _, bits, count in _PTX_PARAM.findall(params)]
            for name, params in _PTX_ENTRY.findall(ptx)}


_KIND_BYTES = {"ptr": 8, "iptr": 8, "i32": 4}


def declared_sizes(kinds, dtype) -> list[int]:
    """Parameter sizes in bytes that a launch-table entry declares (``real`` is the dtype's item size)."""
    return [_KIND_BYTES.get(k) or np.dtype(dtype).itemsize for k in kinds]


def check_launch_log(log) -> set:
    """Check every recorded launch ``(module code, kernel name, packed sizes)`` against the PTX of its module;
    return the names launched."""
    launched = set()
    ptx_cache = {}
    for code, name, sizes in log:
        if code not in ptx_cache:
            ptx_cache[code] = ptx_entries(nvrtc_compile(code, "90", ptx=True, extra=())[0])
        assert name in ptx_cache[code], f"launched {name}, which its module does not define"
        assert sizes == ptx_cache[code][name], f"{name}: passed {sizes} bytes, PTX parameters {ptx_cache[code][name]}"
        launched.add(name)
    return launched
