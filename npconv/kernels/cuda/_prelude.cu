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

// ---- a small tiled matrix product, shared by the kernels for small problems (igemm.cu, _bicluster.cu) --------
// A block of NPC_TG_THREADS threads accumulates one NPC_TG_BM x NPC_TG_BN tile of C = A (M x K) B (K x N) over
// k_begin <= k < k_end. The caller's loaders hand out the operands: la(k) is A[row, k] for the one row of the tile
// this thread loads (row = tile row threadIdx.x % 32), lb(k) is B[k, col] for its one column (col = tile column
// threadIdx.x % 32); each returns 0 outside the matrix. Each thread loads 8 elements of each operand per step of
// NPC_TG_BK (k = k0 + threadIdx.x / 32 + 2 i), the next step's while it multiplies the current one (registers), and
// owns acc[u][v] = C[tile row 4 ty + u, tile column 4 tx + v], ty = threadIdx.x / 8, tx = threadIdx.x % 8.
// Every thread of the block must call it with the same k range (it has barriers).
#define NPC_TG_BM 32
#define NPC_TG_BN 32
#define NPC_TG_BK 16
#define NPC_TG_THREADS 64

template <class LoadA, class LoadB>
__device__ __forceinline__ void npc_tile_gemm(const LoadA& la, const LoadB& lb, int k_begin, int k_end,
                                              real_t (&acc)[4][4]) {
  __shared__ __align__(16) real_t As[NPC_TG_BK][NPC_TG_BM];
  __shared__ __align__(16) real_t Bs[NPC_TG_BK][NPC_TG_BN];
  const int q = threadIdx.x >> 5, r = threadIdx.x & 31;
  const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;
  real_t ra[8], rb[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int k = k_begin + q + 2 * i;
    ra[i] = k < k_end ? la(k) : real_t(0);
    rb[i] = k < k_end ? lb(k) : real_t(0);
  }
  for (int k0 = k_begin; k0 < k_end; k0 += NPC_TG_BK) {
    __syncthreads();   // the last step's products are done with the tiles
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      As[q + 2 * i][r] = ra[i];
      Bs[q + 2 * i][r] = rb[i];
    }
    __syncthreads();
    if (k0 + NPC_TG_BK < k_end) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int k = k0 + NPC_TG_BK + q + 2 * i;
        ra[i] = k < k_end ? la(k) : real_t(0);
        rb[i] = k < k_end ? lb(k) : real_t(0);
      }
    }
#pragma unroll
    for (int kk = 0; kk < NPC_TG_BK; ++kk) {
      real_t a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = As[kk][4 * ty + u];
        b[u] = Bs[kk][4 * tx + u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += a[u] * b[v];
    }
  }
}
