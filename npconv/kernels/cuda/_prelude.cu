// npconv CUDA prelude. loader.py puts this text in front of every kernel source, after two lines
//     #define NPCONV_REAL float|double
//     #define NPCONV_SFX  f32|f64
// so that one .cu file gives one module per dtype. It is not a kernel source of its own.
//
// Rules for the kernel sources (checked by tests/kernels):
//  * kernels are declared with NPCONV_KERNEL(base) / NPCONV_KERNEL_LB(base, threads): extern "C" entry points
//    named npconv_<base>_<f32|f64>, so cupy.RawModule.get_function needs no name_expressions;
//  * scalar parameters are int (np.int32 on the Python side) or real_t (np.float32 / np.float64);
//  * no headers and no FLT_MAX / INFINITY macros (NVRTC has no <cfloat>): use npc_neg_inf().
typedef NPCONV_REAL real_t;

#define NPCONV_JOIN_(a, b) a##_##b
#define NPCONV_JOIN(a, b) NPCONV_JOIN_(a, b)
#define NPCONV_KERNEL(base) extern "C" __global__ void NPCONV_JOIN(npconv_##base, NPCONV_SFX)
#define NPCONV_KERNEL_LB(base, threads) \
  extern "C" __global__ void __launch_bounds__(threads) NPCONV_JOIN(npconv_##base, NPCONV_SFX)
// ... and at least min_blocks resident blocks a multiprocessor (caps the registers a thread at 64K / (threads*blocks))
#define NPCONV_KERNEL_LB_MIN(base, threads, min_blocks) \
  extern "C" __global__ void __launch_bounds__(threads, min_blocks) NPCONV_JOIN(npconv_##base, NPCONV_SFX)

// grid-stride loop over [0, total); ops.py keeps total + gridDim.x * blockDim.x below 2^31
#define NPCONV_FOR_EACH(i, total) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (total); i += blockDim.x * gridDim.x)

// overloads so that one kernel body serves float and double
__device__ __forceinline__ float npc_exp(float v) { return expf(v); }
__device__ __forceinline__ double npc_exp(double v) { return exp(v); }
__device__ __forceinline__ float npc_pow(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double npc_pow(double a, double b) { return pow(a, b); }
__device__ __forceinline__ float npc_neg_inf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double npc_neg_inf(double) { return -__longlong_as_double(0x7ff0000000000000LL); }

// NaN-propagating maximum (a NaN in a window gives NaN, as in PyTorch); v != v is true only for NaN
__device__ __forceinline__ real_t npc_max_nan(real_t best, real_t v) { return (v > best || v != v) ? v : best; }

// ReLU that keeps NaN (fmax would turn NaN into 0)
__device__ __forceinline__ real_t npc_relu(real_t v) { return v < real_t(0) ? real_t(0) : v; }

__device__ __forceinline__ bool npc_inside(int i, int n) { return (unsigned)i < (unsigned)n; }
