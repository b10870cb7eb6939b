// Kernels of the factored (low-rank) layers: npconv.kernels.cuda.ops_lowrank launches them, from its own launch
// table (ops_lowrank.LAUNCH_SIGNATURES). The leading underscore keeps this file out of loader.source_names(),
// which lists the sources of ops.py's table; ops_lowrank builds it with the same prelude and #defines.
//
//  * mono_conv   -- the monochromatic conv, fused: the C' x C colour transform is done on the fly for a tile of
//                   the input (into shared memory), then each output channel of that colour runs its X x Y
//                   single-channel filter on the tile. The C' colour images never exist in global memory.
//  * factor_conv -- a direct conv for the stages of the low-rank and separable layers (few filters, or 1-D
//                   kernels): 16 filters per block held in registers, their weights in shared memory one chunk of
//                   input channels at a time, so no im2col matrix is built and any channel count fits.

#define NPCONV_MONO_FT 8
#define NPCONV_FACTOR_FT 16

// Monochromatic conv.
//   x (N, C, H, W); T (C', C) colours; spatial (F, KH*KW); order (F,): the filters sorted by colour;
//   starts (C'+1,): the filters of colour p are order[starts[p] .. starts[p+1]-1]; bias (F,) when has_bias.
//   y (N, F, OH, OW). Zero padding PT/PL at the top/left (bottom/right padding only enters through OH/OW).
// Launch: block (TW, TH) with TW*TH <= 256; grid (tiles_h * tiles_w, C', min(N, 65535)); one output pixel per
// thread, a TH x TW tile of output pixels per block. Dynamic shared memory, in real_t elements:
//   TIH * TIW (the colour tile; TIH = (TH-1)*SH + KH, TIW = (TW-1)*SW + KW) + KH*KW*NPCONV_MONO_FT (weights).
NPCONV_KERNEL_LB(mono_conv, 256)(const real_t* __restrict__ x, const real_t* __restrict__ T,
                                 const real_t* __restrict__ spatial, const int* __restrict__ order,
                                 const int* __restrict__ starts, const real_t* __restrict__ bias,
                                 real_t* __restrict__ y, int N, int C, int H, int W, int F, int KH, int KW,
                                 int SH, int SW, int PT, int PL, int OH, int OW, int tiles_w, int has_bias) {
  extern __shared__ __align__(16) unsigned char npconv_mono_smem[];
  const int FT = NPCONV_MONO_FT;
  const int TW = blockDim.x;
  const int TH = blockDim.y;
  const int TIH = (TH - 1) * SH + KH;
  const int TIW = (TW - 1) * SW + KW;
  const int KK = KH * KW;
  real_t* tile = reinterpret_cast<real_t*>(npconv_mono_smem);
  real_t* wsh = tile + TIH * TIW;  // wsh[k * FT + f]

  const int p = blockIdx.y;
  const int g0 = starts[p];
  const int g1 = starts[p + 1];
  if (g0 >= g1) return;  // a colour no filter reads: the whole block leaves before any barrier

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * TW + tx;
  const int nthreads = TW * TH;
  const int oh = (blockIdx.x / tiles_w) * TH + ty;
  const int ow = (blockIdx.x % tiles_w) * TW + tx;
  const int ih0 = (blockIdx.x / tiles_w) * TH * SH - PT;
  const int iw0 = (blockIdx.x % tiles_w) * TW * SW - PL;
  const bool active = oh < OH && ow < OW;
  const size_t HW = (size_t)H * W;
  const size_t P = (size_t)OH * OW;
  const real_t* Tp = T + (size_t)p * C;

  for (int n = blockIdx.z; n < N; n += gridDim.z) {
    __syncthreads();  // the previous image's tile is no longer read
    const real_t* xn = x + (size_t)n * C * HW;
    for (int j = tid; j < TIH * TIW; j += nthreads) {
      const int r = j / TIW;
      const int q = j - r * TIW;
      const int ih = ih0 + r;
      const int iw = iw0 + q;
      real_t v = real_t(0);  // the colour of zero padding is zero
      if (npc_inside(ih, H) && npc_inside(iw, W)) {
        const real_t* xp = xn + (size_t)ih * W + iw;
        for (int c = 0; c < C; ++c) v += __ldg(Tp + c) * __ldg(xp + c * HW);
      }
      tile[j] = v;
    }
    for (int f0 = g0; f0 < g1; f0 += FT) {
      const int nf = min(FT, g1 - f0);
      __syncthreads();  // the tile is written; the previous chunk's weights are no longer read
      for (int j = tid; j < KK * FT; j += nthreads) {
        const int f = j % FT;
        const int k = j / FT;
        wsh[j] = f < nf ? __ldg(spatial + (size_t)order[f0 + f] * KK + k) : real_t(0);
      }
      __syncthreads();
      if (active) {
        real_t acc[NPCONV_MONO_FT];
#pragma unroll
        for (int f = 0; f < NPCONV_MONO_FT; ++f) acc[f] = real_t(0);
        const real_t* wk = wsh;
        for (int kh = 0; kh < KH; ++kh) {
          const real_t* row = tile + (ty * SH + kh) * TIW + tx * SW;
          for (int kw = 0; kw < KW; ++kw, wk += NPCONV_MONO_FT) {
            const real_t v = row[kw];
#pragma unroll
            for (int f = 0; f < NPCONV_MONO_FT; ++f) acc[f] += v * wk[f];
          }
        }
#pragma unroll
        for (int f = 0; f < NPCONV_MONO_FT; ++f) {
          if (f < nf) {
            const int fo = order[f0 + f];
            real_t v = acc[f];
            if (has_bias) v += bias[fo];
            y[((size_t)n * F + fo) * P + (size_t)oh * OW + ow] = v;
          }
        }
      }
    }
  }
}

// Direct convolution, groups == 1: x (N, C, H, W), w (F, C, KH, KW), bias (F,) when has_bias, y (N, F, OH, OW).
// Launch: 1-D blocks (at most 256 threads), grid (pixel blocks, ceil(F / NPCONV_FACTOR_FT)); the pixel loop is
// grid-stride with a trip count that is the same for every thread of a block (the loop holds barriers).
// Dynamic shared memory: CC * KH * KW * NPCONV_FACTOR_FT real_t, the weights of the block's filters for CC input
// channels (CC >= 1; ops_lowrank picks it so the buffer fits its budget), laid out wsh[k * FT + f].
NPCONV_KERNEL_LB(factor_conv, 256)(const real_t* __restrict__ x, const real_t* __restrict__ w,
                                   const real_t* __restrict__ bias, real_t* __restrict__ y,
                                   int N, int C, int H, int W, int F, int KH, int KW, int SH, int SW,
                                   int PT, int PL, int DH, int DW, int OH, int OW, int CC, int has_bias) {
  extern __shared__ __align__(16) unsigned char npconv_factor_smem[];
  real_t* wsh = reinterpret_cast<real_t*>(npconv_factor_smem);
  const int FT = NPCONV_FACTOR_FT;
  const int KK = KH * KW;
  const int f0 = blockIdx.y * FT;
  const int P = OH * OW;
  const int total = N * P;
  const size_t HW = (size_t)H * W;
  for (int base = blockIdx.x * blockDim.x; base < total; base += blockDim.x * gridDim.x) {
    const int i = base + threadIdx.x;
    const bool active = i < total;
    const int n = active ? i / P : 0;
    const int pix = active ? i - n * P : 0;
    const int oh = pix / OW;
    const int ow = pix - oh * OW;
    const int ih0 = oh * SH - PT;
    const int iw0 = ow * SW - PL;
    real_t acc[NPCONV_FACTOR_FT];
#pragma unroll
    for (int f = 0; f < NPCONV_FACTOR_FT; ++f) acc[f] = real_t(0);
    for (int c0 = 0; c0 < C; c0 += CC) {
      const int cc = min(CC, C - c0);
      __syncthreads();  // the previous chunk's weights are no longer read
      for (int j = threadIdx.x; j < cc * KK * FT; j += blockDim.x) {
        const int f = j % FT;
        const int k = j / FT;  // (c - c0) * KK + kh * KW + kw
        wsh[j] = (f0 + f < F) ? __ldg(w + ((size_t)(f0 + f) * C + c0) * KK + k) : real_t(0);
      }
      __syncthreads();
      if (active) {
        const real_t* wk = wsh;
        for (int c = 0; c < cc; ++c) {
          const real_t* xc = x + ((size_t)n * C + c0 + c) * HW;
          for (int kh = 0; kh < KH; ++kh) {
            const int ih = ih0 + kh * DH;
            const bool row_ok = npc_inside(ih, H);
            for (int kw = 0; kw < KW; ++kw, wk += NPCONV_FACTOR_FT) {
              const int iw = iw0 + kw * DW;
              real_t v = real_t(0);
              if (row_ok && npc_inside(iw, W)) v = __ldg(xc + (size_t)ih * W + iw);
#pragma unroll
              for (int f = 0; f < NPCONV_FACTOR_FT; ++f) acc[f] += v * wk[f];
            }
          }
        }
      }
    }
    if (active) {
#pragma unroll
      for (int f = 0; f < NPCONV_FACTOR_FT; ++f) {
        if (f0 + f < F) {
          real_t v = acc[f];
          if (has_bias) v += bias[f0 + f];
          y[((size_t)n * F + f0 + f) * P + pix] = v;
        }
      }
    }
  }
}
