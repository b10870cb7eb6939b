"""Run CUDA C kernel sources on the CPU: a stand-in for ``cupy.RawModule`` / ``cupy.RawKernel``.

``CpuRawModule(code=..., options=...)`` compiles the source with g++ against ``cuda_shim.h`` (once per distinct
source: the shared library is cached under a temporary directory keyed by a hash of everything that goes into
it) and ``.get_function(name)(grid, block, args, shared_mem=0)`` launches a kernel the way CuPy does, with NumPy
arrays standing in for device arrays.

What a launch checks, beyond running the code:
  * the argument count, and each argument's size against ``sizeof`` of the kernel parameter, with arguments
    packed as CuPy packs them (a Python int becomes a 64-bit integer and a Python float a double, so an ``int``
    or ``float`` parameter given a plain Python number is reported);
  * array arguments are C-contiguous, their itemsize equals the pointee size, and an array behind a
    ``const T*`` parameter is left unchanged;
  * arrays are copied into buffers with 256 guard bytes on each side, filled with 0xFF (NaN): reading just
    outside an array gives NaN, writing there is reported;
  * ``__launch_bounds__``, the block/grid limits and the 48 KiB shared-memory limit; barriers reached by only
    part of a block (see ``cuda_shim.h``); shared memory starts as NaN in every block.
The threads of a block run forward or in reverse order (:func:`thread_order`), so run both.

Not supported: warp intrinsics (shuffles, votes), ``__constant__`` memory, ``name_expressions``, atomics across
concurrently running threads (blocks and threads run one at a time).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np

__all__ = ["CpuRawModule", "CpuRawKernel", "EmulatorError", "thread_order", "cache_dir", "compiler"]

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(HERE, "cuda_shim.h")
GUARD = 256                    # guard bytes on each side of every array argument
_ORDERS = {"forward": 0, "reverse": 1}
_CXX_FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off",
              "-fno-fast-math", "-w")
_MARK = "NPCONV_EMU_GLOBAL_MARK"
_KERNEL_RE = re.compile(
    r'(extern\s+"C"\s+)?' + _MARK + r'\s+void\s+(?:__launch_bounds__\s*\(\s*(\d+)[^)]*\)\s*)?(\w+)\s*\(')
_DYN_SMEM_RE = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")

_state = threading.local()
_launch_lock = threading.Lock()      # the shim's scheduler state is per process


class EmulatorError(RuntimeError):
    """A kernel launch that would fail or misbehave on a GPU (bad launch configuration, divergent barrier,
    a write outside an array or into a const input)."""


def compiler() -> str | None:
    """The C++ compiler used (``$CXX`` or ``g++``), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir() -> str:
    """Where built modules are kept: ``$NPCONV_EMU_CACHE`` or ``<tmp>/npconv_cuda_emu_<uid>``."""
    d = os.environ.get("NPCONV_EMU_CACHE") or os.path.join(tempfile.gettempdir(), f"npconv_cuda_emu_{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


@contextlib.contextmanager
def thread_order(order: str):
    """Within the block, run threads ``"forward"`` (0, 1, ...) or ``"reverse"``; applies to launches that do not
    pass ``order=`` themselves."""
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {sorted(_ORDERS)}, got {order!r}")
    old = getattr(_state, "order", "forward")
    _state.order = order
    try:
        yield
    finally:
        _state.order = old


def _translate(code: str) -> str:
    """``extern __shared__ T name[];`` -> ``name`` is the launch's dynamic shared-memory buffer."""
    return _DYN_SMEM_RE.sub(
        lambda m: f"\n#undef {m[2]}\n#define {m[2]} (reinterpret_cast<{m[1]}*>(::emu::dynamic_smem))\n", code)


def _run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise EmulatorError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{r.stderr[-4000:]}")
    return r.stdout


def _find_kernels(code: str, cxx: str, defines):
    """(name, launch bound or None) of every __global__ function, found by running the preprocessor (kernel
    names are often built by macros)."""
    r = subprocess.run([cxx, "-E", "-P", "-x", "c++", "-std=c++17", *defines, f"-D__global__={_MARK}", "-"],
                       input=code, capture_output=True, text=True)
    if r.returncode:
        raise EmulatorError(f"preprocessing the kernel source failed:\n{r.stderr[-4000:]}")
    kernels = []
    for m in _KERNEL_RE.finditer(r.stdout):
        if not m[1]:
            raise EmulatorError(f"__global__ function {m[3]} is not extern \"C\": its name would be mangled and "
                                "cupy.RawModule.get_function could not find it")
        kernels.append((m[3], int(m[2]) if m[2] else None))
    return kernels


class CpuRawModule:
    """CPU stand-in for ``cupy.RawModule(code=..., options=...)``.

    ``options``: ``-D``/``-U``/``-I`` options are passed to g++, the others (NVRTC-only) are ignored.
    """

    def __init__(self, code: str, options=(), name_expressions=None, *, name: str = "kernel.cu"):
        if name_expressions:
            raise NotImplementedError("the CPU emulator does not support name_expressions: export extern \"C\" "
                                      "wrappers instead")
        cxx = compiler()
        if cxx is None:
            raise EmulatorError("no C++ compiler found (set CXX or install g++)")
        defines = [o for o in options if o.startswith(("-D", "-U", "-I"))]
        with open(SHIM, encoding="utf-8") as f:
            shim_text = f.read()
        key = hashlib.sha256("\0".join([code, shim_text, cxx, *_CXX_FLAGS, *defines]).encode()).hexdigest()[:24]
        base = os.path.join(cache_dir(), key)
        so, meta = base + ".so", base + ".json"
        if not (os.path.exists(so) and os.path.exists(meta)):
            kernels = _find_kernels(code, cxx, defines)
            src = (f'#include "{SHIM}"\n#line 1 "{name}"\n{_translate(code)}\n'
                   + "".join(f"NPCONV_EMU_EXPORT({k})\n" for k, _ in kernels))
            tmp = f"{base}.{os.getpid()}.{threading.get_ident()}"
            with open(tmp + ".cpp", "w", encoding="utf-8") as f:
                f.write(src)
            try:
                _run([cxx, *_CXX_FLAGS, *defines, tmp + ".cpp", "-o", tmp + ".so"], f"g++ build of {name}")
                with open(tmp + ".json", "w", encoding="utf-8") as f:
                    json.dump({"kernels": kernels}, f)
                os.replace(tmp + ".so", so)
                os.replace(tmp + ".json", meta)
            finally:
                for suffix in (".cpp", ".so", ".json"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tmp + suffix)
        with open(meta, encoding="utf-8") as f:
            self._bounds = {k: b for k, b in json.load(f)["kernels"]}
        self._lib = ctypes.CDLL(so)
        self._lib.npconv_emu_error.restype = ctypes.c_char_p
        self._lib.npconv_emu_static_smem.restype = ctypes.c_size_t
        self.name = name
        self._kernels = {}

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._bounds))

    def get_function(self, name: str) -> "CpuRawKernel":
        if name not in self._bounds:
            raise AttributeError(f"no __global__ function {name!r} in {self.name}; it has {self.kernel_names}")
        if name not in self._kernels:
            self._kernels[name] = CpuRawKernel(self._lib, name, self._bounds[name])
        return self._kernels[name]


def _pack_scalar(a):
    """A scalar as CuPy passes it to a RawKernel: Python bool/int/float -> bool/int64/float64, NumPy scalars as
    they are."""
    if isinstance(a, (bool, np.bool_)):
        return np.bool_(a)
    if isinstance(a, int):
        return np.int64(a)
    if isinstance(a, float):
        return np.float64(a)
    if isinstance(a, np.generic):
        return a
    raise TypeError(f"unsupported kernel argument type {type(a).__name__}")


class CpuRawKernel:
    """One kernel of a :class:`CpuRawModule`; call it like ``cupy.RawKernel``."""

    def __init__(self, lib, name, launch_bound):
        self.name = name
        self.launch_bound = launch_bound
        self._lib = lib
        self._launch = getattr(lib, f"npconv_emu_launch_{name}")
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p)]
        describe = getattr(lib, f"npconv_emu_describe_{name}")
        n = describe(None)
        table = (ctypes.c_size_t * max(4 * n, 1))()
        describe(table)
        #: per parameter: (size in bytes, is a pointer, pointee size, pointee is const)
        self.params = [tuple(table[4 * i:4 * i + 4]) for i in range(n)]

    @property
    def param_sizes(self) -> list[int]:
        return [p[0] for p in self.params]

    def __call__(self, grid, block, args, shared_mem=0, *, order=None):
        grid = tuple(int(v) for v in (tuple(grid) + (1, 1))[:3])
        block = tuple(int(v) for v in (tuple(block) + (1, 1))[:3])
        order = order or getattr(_state, "order", "forward")
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {sorted(_ORDERS)}, got {order!r}")
        threads = block[0] * block[1] * block[2]
        if self.launch_bound is not None and threads > self.launch_bound:
            raise EmulatorError(f"{self.name}: {threads} threads per block exceed __launch_bounds__"
                                f"({self.launch_bound})")
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: {len(args)} arguments given, the kernel takes {len(self.params)}")
        values, buffers = [], {}     # data address -> [array, guarded copy, const, first argument index]
        for i, (a, (size, is_ptr, pointee, const)) in enumerate(zip(args, self.params)):
            if isinstance(a, np.ndarray):
                if not is_ptr:
                    raise TypeError(f"{self.name}: argument {i} is an array but the parameter is a "
                                    f"{size}-byte value")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: argument {i} is not C-contiguous (a kernel indexes it as such)")
                if pointee and a.itemsize != pointee:
                    raise TypeError(f"{self.name}: argument {i} has itemsize {a.itemsize} ({a.dtype}) but the "
                                    f"parameter points to {pointee}-byte elements")
                values.append(self._guarded(i, a, bool(const), buffers))
            else:
                v = _pack_scalar(a)
                if is_ptr or v.nbytes != size:
                    raise TypeError(f"{self.name}: argument {i} is a {v.nbytes}-byte {type(v).__name__} (from "
                                    f"{type(a).__name__}) but the parameter is {size} bytes"
                                    + (" (a pointer)" if is_ptr else ""))
                values.append(ctypes.create_string_buffer(v.tobytes(), v.nbytes))
        ptrs = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
        with _launch_lock:
            self._lib.npconv_emu_set_order(_ORDERS[order])
            rc = self._launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), int(shared_mem), ptrs)
            err = self._lib.npconv_emu_error().decode() if rc else ""
        if rc:
            raise EmulatorError(f"{self.name}: {err}")
        for a, buf, const, first in buffers.values():
            n = a.nbytes
            if not (buf[:GUARD] == 0xFF).all() or not (buf[GUARD + n:] == 0xFF).all():
                raise EmulatorError(f"{self.name}: the kernel wrote outside the {n}-byte array of argument {first}")
            body = buf[GUARD:GUARD + n]
            if const:
                if body.tobytes() != _bytes(a).tobytes():
                    raise EmulatorError(f"{self.name}: the kernel modified argument {first}, a const input")
            else:
                _bytes(a)[...] = body

    def _guarded(self, i, a, const, buffers):
        """A pointer to a copy of ``a`` between two guard areas; an array passed twice shares one copy."""
        addr, n = a.ctypes.data, a.nbytes
        entry = buffers.get(addr)
        if entry is None:
            for other, (b, _, _, j) in buffers.items():
                if n and b.nbytes and addr < other + b.nbytes and other < addr + n:
                    raise NotImplementedError(f"{self.name}: arguments {j} and {i} overlap partially")
            buf = np.full(n + 2 * GUARD, 0xFF, dtype=np.uint8)
            buf[GUARD:GUARD + n] = _bytes(a)
            entry = buffers[addr] = [a, buf, const, i]
        elif entry[0].nbytes != n:
            raise NotImplementedError(f"{self.name}: arguments {entry[3]} and {i} overlap partially")
        else:
            entry[2] = entry[2] and const   # written through any non-const parameter
        return ctypes.c_void_p(entry[1].ctypes.data + GUARD)


def _bytes(a):
    """The bytes of a C-contiguous array, as a writeable uint8 view."""
    return a.reshape(-1).view(np.uint8).view(np.ndarray)
