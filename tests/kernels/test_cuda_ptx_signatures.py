"""The arguments ops.py passes to each kernel match the kernel's parameters as compiled: sizes read from the PTX
``.entry`` declarations (CuPy passes arguments by value with no check, so a Python int given to an ``int``
parameter, or a Python float to a ``float`` one, would silently read garbage on a GPU).

Two checks: ops.LAUNCH_SIGNATURES (the table ops.py packs arguments from) against the PTX of every source and
dtype; and every launch ops.py actually makes, recorded through a CuPy stand-in whose kernels only record their
arguments, packed the way CuPy packs them.
"""
from __future__ import annotations

import functools
import types

import numpy as np
import pytest
from nvrtc_tools import check_launch_log, ptx_entries, ptx_of_source

from npconv.kernels.cuda import loader, ops

pytestmark = pytest.mark.nvrtc
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def declared_sizes(kinds, dtype):
    return [{"ptr": 8, "i32": 4, "real": np.dtype(dtype).itemsize}[k] for k in kinds]


def cupy_packed_size(arg):
    """Bytes CuPy passes for a RawKernel argument: a device array is a pointer; Python bool, int and float become
    bool, int64 and float64; NumPy scalars keep their type."""
    if isinstance(arg, np.ndarray):          # the CuPy stand-in's device arrays are NumPy subclasses
        return 8
    if isinstance(arg, (bool, np.bool_)):
        return 1
    if isinstance(arg, int):
        return 8
    if isinstance(arg, float):
        return 8
    if isinstance(arg, np.generic):
        return arg.itemsize
    raise TypeError(f"CuPy cannot pass a {type(arg).__name__} to a kernel")


def mismatches(table, dtype, entries_of):
    """Human-readable differences between a launch-signature table and the compiled kernels."""
    out = []
    for name, (source, kinds) in sorted(table.items()):
        full = loader.kernel_name(name, dtype)
        entries = entries_of(source, dtype)
        if full not in entries:
            out.append(f"{full}: no such entry in {source}.cu (has {sorted(entries)})")
        elif entries[full] != declared_sizes(kinds, dtype):
            out.append(f"{full}: PTX parameter bytes {entries[full]}, declared {declared_sizes(kinds, dtype)}")
    return out


@functools.lru_cache(maxsize=None)
def entries_of(source, dtype):
    return ptx_entries(ptx_of_source(source, np.dtype(dtype).name))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_launch_table_matches_ptx(dtype):
    assert mismatches(ops.LAUNCH_SIGNATURES, dtype, entries_of) == []
    # and the table lists every entry point of every source (no kernel launched outside it)
    compiled = {n for s in loader.source_names() for n in entries_of(s, dtype)}
    assert compiled == {loader.kernel_name(k, dtype) for k in ops.LAUNCH_SIGNATURES}


def test_a_wrong_declaration_is_caught():
    bad = dict(ops.LAUNCH_SIGNATURES)
    source, kinds = bad["lrn"]
    bad["lrn"] = (source, kinds[:-1] + ("i32",))                     # k declared int, kernel takes real_t
    found = mismatches(bad, np.float64, entries_of)
    assert found == ["npconv_lrn_f64: PTX parameter bytes [8, 8, 4, 4, 4, 4, 8, 8, 8], "
                     "declared [8, 8, 4, 4, 4, 4, 8, 8, 4]"]


def test_constants_shared_with_the_sources():
    """ops.py's block size for the softmax and filters-per-block for the direct kernel equal the #defines."""
    import re
    text = loader.source_text("softmax", np.float32) + loader.source_text("conv_direct", np.float32)
    assert int(re.search(r"#define NPCONV_SOFTMAX_THREADS (\d+)", text)[1]) == ops.SOFTMAX_THREADS
    assert int(re.search(r"#define NPCONV_DIRECT_FT (\d+)", text)[1]) == ops.DIRECT_FILTERS_PER_BLOCK


# --- what ops.py really passes -------------------------------------------------------------------------------------

class _Recorder:
    """A RawModule whose kernels record (code, kernel name, packed argument sizes) instead of running."""

    def __init__(self, log, code, options=(), name_expressions=None):
        self.log, self.code = log, code

    def get_function(self, name):
        def kernel(grid, block, args, shared_mem=0):
            self.log.append((self.code, name, [cupy_packed_size(a) for a in args]))
        return kernel


@pytest.fixture
def recording_cupy(monkeypatch):
    import npconv._backend
    from cuda_emulator import fake_cupy
    log = []
    cp = types.SimpleNamespace(**{k: getattr(fake_cupy, k) for k in dir(fake_cupy) if not k.startswith("_")})
    cp.RawModule = functools.partial(_Recorder, log)
    monkeypatch.setattr(npconv._backend, "require_cupy", lambda: cp)
    loader.clear_cache()
    yield cp, log
    loader.clear_cache()


def _drive_every_op(cp, dtype, rng):
    def a(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(dtype))
    conv = dict(stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1))
    ops.conv2d(a(2, 6, 6, 6), a(4, 6, 3, 3), a(4), groups=1, **conv)             # im2col + scatter
    ops.conv2d(a(2, 3, 6, 6), a(4, 3, 3, 3), None, groups=1, **conv)             # direct
    mp = pytest.MonkeyPatch()
    mp.setattr(ops, "WINOGRAD_MIN_CHANNELS", 1)
    mp.setattr(ops, "WINOGRAD_MIN_TILES", 1)
    try:
        ops.conv2d(a(2, 6, 6, 6), a(4, 6, 3, 3), a(4), groups=1, **conv)         # Winograd
    finally:
        mp.undo()
    ops.conv2d(a(2, 4, 6, 6), a(4, 1, 3, 3), a(4), groups=4, **conv)             # depthwise
    ops.conv2d(a(2, 6, 6, 6), a(4, 6, 1, 1), a(4), groups=1, stride=(1, 1), padding=(0, 0, 0, 0),
               dilation=(1, 1))                                                  # 1x1 + bias_add
    ops.linear(a(2, 5), a(3, 5), a(3))
    ops.max_pool2d(a(1, 2, 5, 5), kernel=(3, 3), stride=(2, 2), padding=(1, 1), out_hw=(3, 3))
    ops.avg_pool2d(a(1, 2, 5, 5), kernel=(3, 3), stride=(2, 2), padding=(1, 1), out_hw=(3, 3), count_include_pad=False)
    ops.local_response_norm(a(1, 4, 3, 3), size=5, alpha=1e-4, beta=0.75, k=2.0)
    ops.relu(a(7))
    ops.bias_relu(a(2, 3, 2, 2), a(3))
    ops.bias_relu(a(2, 3, 2, 2), None)
    ops.softmax(a(3, 10))
    ops.normalize(a(2, 3, 2, 2), mean=a(3), scale=a(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_every_launch_matches_ptx(recording_cupy, rng, dtype):
    cp, log = recording_cupy
    _drive_every_op(cp, dtype, rng)
    launched = check_launch_log(log)
    assert launched == {loader.kernel_name(k, dtype) for k in ops.LAUNCH_SIGNATURES}, "some kernel never launched"


def test_recorded_launch_with_a_python_int_is_caught():
    """The packing rule the check relies on: a Python int is 8 bytes, which no ``int`` parameter accepts."""
    entries = entries_of("elementwise", np.float32)
    sizes = [cupy_packed_size(v) for v in (np.zeros(3, np.float32), np.zeros(3, np.float32), 3)]
    assert sizes != entries["npconv_relu_f32"] == [8, 8, 4]
