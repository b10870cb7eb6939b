"""The CPU emulator reports the mistakes it is there to catch (so a passing emulated test means something)."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.cpuemu
i32 = np.int32

PROBES = r'''
extern "C" __global__ void shift_nobarrier(const float* x, float* y, int n) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = x[t];
  y[t] = t + 1 < n ? s[t + 1] : 0.0f;     // reads a neighbour's slot without a barrier
}
extern "C" __global__ void shift_barrier(const float* x, float* y, int n) {
  __shared__ float s2[64];
  const int t = threadIdx.x;
  s2[t] = x[t];
  __syncthreads();
  y[t] = t + 1 < n ? s2[t + 1] : 0.0f;
}
extern "C" __global__ void partial_barrier(float* y) {
  if (threadIdx.x < 16) __syncthreads();
  y[threadIdx.x] = 1.0f;
}
extern "C" __global__ void two_barriers(float* y) {
  if (threadIdx.x < 16) { __syncthreads(); y[threadIdx.x] = 1.0f; }
  else { __syncthreads(); y[threadIdx.x] = 2.0f; }
}
extern "C" __global__ void smem_per_block(float* y) {
  __shared__ float s3[32];
  if (blockIdx.x == 0) s3[threadIdx.x] = 1.0f;
  __syncthreads();
  y[blockIdx.x * 32 + threadIdx.x] = s3[threadIdx.x];
}
extern "C" __global__ void dyn_smem(float* y) {
  extern __shared__ float buf[];
  if (threadIdx.x == 0) buf[1] = 5.0f;
  __syncthreads();
  y[threadIdx.x] = buf[threadIdx.x];
}
extern "C" __global__ void write_past_end(float* y, int n) { y[threadIdx.x + 1] = 1.0f; }
extern "C" __global__ void write_const(const float* x) { const_cast<float*>(x)[threadIdx.x] = 0.0f; }
extern "C" __global__ void __launch_bounds__(64) bounded(float* y) { y[threadIdx.x] = 1.0f; }
'''


@pytest.fixture(scope="module")
def probes():
    from cuda_emulator import CpuRawModule
    return CpuRawModule(PROBES, name="probes.cu")


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_barrier_kernel_is_right_in_both_orders(probes, order):
    x = np.arange(64, dtype=np.float32)
    y = np.full(64, np.nan, np.float32)
    probes.get_function("shift_barrier")((1,), (64,), (x, y, i32(64)), order=order)
    np.testing.assert_array_equal(y, np.append(x[1:], 0))


def test_missing_barrier_shows_up_in_one_order(probes):
    x = np.arange(64, dtype=np.float32)
    ys = {}
    for order in ("forward", "reverse"):
        ys[order] = np.full(64, -1, np.float32)
        probes.get_function("shift_nobarrier")((1,), (64,), (x, ys[order], i32(64)), order=order)
    assert np.isnan(ys["forward"][:63]).all()                       # read before the neighbour wrote: NaN poison
    np.testing.assert_array_equal(ys["reverse"], np.append(x[1:], 0))  # this order happens to hide it


def test_divergent_barriers_are_reported(probes):
    from cuda_emulator import EmulatorError
    y = np.zeros(32, np.float32)
    with pytest.raises(EmulatorError, match="divergent barrier"):
        probes.get_function("partial_barrier")((1,), (32,), (y,))
    with pytest.raises(EmulatorError, match="divergent barrier"):
        probes.get_function("two_barriers")((1,), (32,), (y,))


def test_shared_memory_is_poisoned_for_every_block(probes):
    y = np.zeros(64, np.float32)
    probes.get_function("smem_per_block")((2,), (32,), (y,))
    assert (y[:32] == 1).all() and np.isnan(y[32:]).all()


def test_dynamic_shared_memory(probes):
    from cuda_emulator import EmulatorError
    y = np.zeros(4, np.float32)
    probes.get_function("dyn_smem")((1,), (4,), (y,), shared_mem=16)
    assert y[1] == 5 and np.isnan(y[[0, 2, 3]]).all()
    with pytest.raises(EmulatorError, match="48 KiB"):
        probes.get_function("dyn_smem")((1,), (4,), (y,), shared_mem=48 * 1024 + 4)


def test_launch_configuration_limits(probes):
    from cuda_emulator import EmulatorError
    y = np.zeros(2048, np.float32)
    with pytest.raises(EmulatorError, match="invalid block"):
        probes.get_function("write_const")((1,), (1025,), (y,))
    with pytest.raises(EmulatorError, match="invalid grid"):
        probes.get_function("write_const")((0,), (32,), (y,))
    with pytest.raises(EmulatorError, match="launch_bounds"):
        probes.get_function("bounded")((1,), (128,), (y,))


def test_out_of_bounds_write_and_const_write_are_reported(probes):
    from cuda_emulator import EmulatorError
    with pytest.raises(EmulatorError, match="wrote outside"):
        probes.get_function("write_past_end")((1,), (8,), (np.zeros(8, np.float32), i32(8)))
    x = np.ones(8, np.float32)
    with pytest.raises(EmulatorError, match="const input"):
        probes.get_function("write_const")((1,), (8,), (x,))
    assert (x == 1).all()


def test_argument_sizes_are_checked_against_the_kernel(emulated):
    """CuPy would pass a Python int as 8 bytes to a 4-byte int parameter; the emulator refuses it."""
    x = np.zeros(10, np.float32)
    relu = emulated.kernel("elementwise", "relu", np.float32)
    with pytest.raises(TypeError, match=r"argument 2 is a 8-byte int64 \(from int\) but the parameter is 4 bytes"):
        relu((1,), (32,), (x, x, 10))
    relu((1,), (32,), (x, x, i32(10)))                                # the right type passes
    lrn = emulated.kernel("lrn", "lrn", np.float32)
    y = np.zeros((1, 2, 5), np.float32)
    with pytest.raises(TypeError, match="argument 6 is a 8-byte float64"):   # Python float for a float
        lrn((1,), (32,), (y, y, i32(1), i32(2), i32(5), i32(3), 1e-4, np.float32(0.75), np.float32(2)))
    with pytest.raises(TypeError, match="itemsize 8"):
        relu((1,), (32,), (x.astype(np.float64), x, i32(10)))       # a float64 array for a float*
    with pytest.raises(ValueError, match="not C-contiguous"):
        relu((1,), (32,), (np.zeros(20, np.float32)[::2], x, i32(10)))
    with pytest.raises(TypeError, match="3 arguments given, the kernel takes 5"):
        emulated.kernel("elementwise", "bias_add", np.float32)((1,), (32,), (x, x, i32(1)))


def test_module_errors():
    from cuda_emulator import CpuRawModule, EmulatorError
    with pytest.raises(EmulatorError, match='not extern "C"'):
        CpuRawModule("__global__ void mangled(float* y) { y[0] = 1.0f; }")
    with pytest.raises(EmulatorError, match="g\\+\\+ build"):
        CpuRawModule('extern "C" __global__ void bad(float* y) { int* p = y; }')
    with pytest.raises(NotImplementedError):
        CpuRawModule('extern "C" __global__ void k(float* y) {}', name_expressions=["k"])
