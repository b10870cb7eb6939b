// Direct convolution for a layer with few input channels (the first layer: RGB input), groups == 1.
//
// Each block handles NPCONV_DIRECT_FT consecutive filters (blockIdx.y) for a range of output pixels; the
// weights of those filters sit in dynamic shared memory as wsh[k*FT + f], k = (c*KH + kh)*KW + kw, so
// every input value read from global memory feeds FT multiply-adds from registers. This avoids the
// im2col workspace, which for such a layer is C*KH*KW = 147 times the input size (7x7, C = 3).
// Dynamic shared memory: C*KH*KW*FT*sizeof(real_t) bytes (ops.py checks it fits).

#define NPCONV_DIRECT_FT 16

NPCONV_KERNEL_LB(conv_direct, 256)(const real_t* __restrict__ x, const real_t* __restrict__ w,
                                   const real_t* __restrict__ bias, real_t* __restrict__ y,
                                   int N, int C, int H, int W, int F, int KH, int KW, int SH, int SW,
                                   int PT, int PL, int DH, int DW, int OH, int OW, int has_bias) {
  extern __shared__ __align__(16) unsigned char npconv_direct_smem[];
  real_t* wsh = reinterpret_cast<real_t*>(npconv_direct_smem);
  const int FT = NPCONV_DIRECT_FT;
  const int K = C * KH * KW;
  const int f0 = blockIdx.y * FT;
  for (int j = threadIdx.x; j < K * FT; j += blockDim.x) {
    const int f = j % FT;
    const int k = j / FT;
    wsh[j] = (f0 + f < F) ? w[(size_t)(f0 + f) * K + k] : real_t(0);
  }
  __syncthreads();

  const int P = OH * OW;
  const int total = N * P;
  NPCONV_FOR_EACH(i, total) {
    const int n = i / P;
    const int p = i - n * P;
    const int oh = p / OW;
    const int ow = p - oh * OW;
    const real_t* xn = x + (size_t)n * C * H * W;
    real_t acc[NPCONV_DIRECT_FT];
#pragma unroll
    for (int f = 0; f < NPCONV_DIRECT_FT; ++f) acc[f] = real_t(0);
    const real_t* wk = wsh;
    for (int c = 0; c < C; ++c) {
      for (int kh = 0; kh < KH; ++kh) {
        const int ih = oh * SH - PT + kh * DH;
        const bool row_ok = npc_inside(ih, H);
        for (int kw = 0; kw < KW; ++kw, wk += NPCONV_DIRECT_FT) {
          const int iw = ow * SW - PL + kw * DW;
          real_t v = real_t(0);
          if (row_ok && npc_inside(iw, W)) v = __ldg(xn + ((size_t)c * H + ih) * W + iw);
#pragma unroll
          for (int f = 0; f < NPCONV_DIRECT_FT; ++f) acc[f] += v * wk[f];
        }
      }
    }
#pragma unroll
    for (int f = 0; f < NPCONV_DIRECT_FT; ++f) {
      if (f0 + f < F) {
        real_t v = acc[f];
        if (has_bias) v += bias[f0 + f];
        y[((size_t)n * F + f0 + f) * P + p] = v;
      }
    }
  }
}
