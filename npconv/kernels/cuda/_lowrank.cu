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
//  * lr_expand8 / lr_expand16 / lr_expand32 -- the 1x1 second stage of the low-rank conv with its bias, for ranks
//                   up to 8, 16 and 32: one pass that reads the t maps once and writes each output once.
//  * lr_conv8 / lr_conv16 / lr_conv32, lr_conv8_px2 / lr_conv16_px2 -- the whole low-rank conv in one launch: a
//                   thread computes the t first-stage values of its output pixel (two for _px2) in registers, then
//                   its F outputs; the t maps never exist in memory.
//  * sep_conv4 / sep_conv8 / sep_conv16 -- the whole separable conv in one launch: a block computes the vertical
//                   pass of the K maps its output tile reads into shared memory, then the horizontal pass from it.

#define NPCONV_MONO_FT 8
#define NPCONV_MONO_SHARE 4
#define NPCONV_MONO_RX 4
#define NPCONV_MONO_RY 2
#define NPCONV_FACTOR_FT 16
#define NPCONV_LRC_UNROLL 4
#define NPCONV_SEP_TC 32
#define NPCONV_SEP_FT 16

// The weights of one tap for an FT-filter pass of mono_conv, read with one aligned load (FT = 8: two LDS.128 in
// float, four in double; FT = 4: one LDS.128 / two; FT = 2: LDS.64 / LDS.128). The buffer starts the dynamic
// shared memory and tap k's row begins at k * FT * sizeof(real_t) bytes, so every row is aligned as declared.
template <int FT> struct npc_mono_wrow;
template <> struct __align__(16) npc_mono_wrow<8> { real_t v[8]; };
template <> struct __align__(16) npc_mono_wrow<4> { real_t v[4]; };
template <> struct __align__(2 * sizeof(real_t)) npc_mono_wrow<2> { real_t v[2]; };

// One filter pass of mono_conv over RY of the thread's output rows (slots) and its NPCONV_MONO_RX columns, for FT
// filters, and the stores. Columns are TW apart (tx + r * TW), so their offsets in the tile are immediates and each
// warp-wide load and store touches consecutive words; row slots are slot_off apart in the tile, yslot in y.
// Per tap a thread loads RY * RX colour values and one weight row, and does FT * RY * RX multiply-adds: FT = 8 runs
// one slot at a time (RY = 1), FT = 4 and 2 both slots at once (RY = 2), so every pass keeps 8 or 16 pixels in
// flight and at most 32 accumulators.
//   tin:  the tile at the thread's first slot, phase 0, column tx; wsh: wsh[k * FT + f], k = kh * KW + kw;
//   yout: y at the thread's first slot and column; rows / cols: valid slots, OW - (first column).
template <int FT, int RY, int TW>
__device__ __forceinline__ void npc_mono_pass(const real_t* __restrict__ tin, int slot_off,
                                              const real_t* __restrict__ wsh, int KH, int KW, int SW, int RS,
                                              int PW, int nf, const int* __restrict__ filters,
                                              const real_t* __restrict__ bias, int has_bias,
                                              real_t* __restrict__ yout, int yslot, size_t P, int rows, int cols) {
  const int RX = NPCONV_MONO_RX;
  real_t acc[FT][RY][NPCONV_MONO_RX];
#pragma unroll
  for (int f = 0; f < FT; ++f)
#pragma unroll
    for (int s = 0; s < RY; ++s)
#pragma unroll
      for (int r = 0; r < RX; ++r) acc[f][s][r] = real_t(0);
  const int nph = min(SW, KW);
  for (int kh = 0; kh < KH; ++kh) {
    for (int ph = 0; ph < nph; ++ph) {
      // taps kw = ph, ph + SW, ...: the colour of tile column o * SW + kw is at phase ph, index o + kw / SW
      const real_t* ip = tin + kh * RS + ph * PW;
      const npc_mono_wrow<FT>* wk = reinterpret_cast<const npc_mono_wrow<FT>*>(wsh) + kh * KW + ph;
#pragma unroll 1
      for (int kw = ph; kw < KW; kw += SW, ++ip, wk += SW) {
        real_t v[RY][NPCONV_MONO_RX];
#pragma unroll
        for (int s = 0; s < RY; ++s)
#pragma unroll
          for (int r = 0; r < RX; ++r) v[s][r] = ip[s * slot_off + r * TW];
        const npc_mono_wrow<FT> w = *wk;
#pragma unroll
        for (int f = 0; f < FT; ++f)
#pragma unroll
          for (int s = 0; s < RY; ++s)
#pragma unroll
            for (int r = 0; r < RX; ++r) acc[f][s][r] += w.v[f] * v[s][r];
      }
    }
  }
#pragma unroll
  for (int f = 0; f < FT; ++f) {
    if (f < nf) {
      const int fo = filters[f];
      const real_t bf = has_bias ? bias[fo] : real_t(0);
      real_t* yf = yout + (size_t)fo * P;
#pragma unroll
      for (int s = 0; s < RY; ++s)
#pragma unroll
        for (int r = 0; r < RX; ++r)
          if (s < rows && r * TW < cols) yf[s * yslot + r * TW] = acc[f][s][r] + bf;
    }
  }
}

// The filter passes of one colour tile, for a block width TW known at compile time: 8 filters per pass while more
// than 4 are left, then 4 (3 or 4 left) or 2 (1 or 2 left), so a pass has at most 3 spare accumulators per pixel
// (1 when under 3 filters are left). Barriers: two per pass, reached by every thread of the block.
template <int TW>
__device__ __forceinline__ void npc_mono_passes(const real_t* __restrict__ tile, real_t* __restrict__ wsh,
                                                const real_t* __restrict__ spatial, const int* __restrict__ order,
                                                int g0, int g1, const real_t* __restrict__ bias, int has_bias,
                                                real_t* __restrict__ yout, size_t P, int OW, int KH, int KW,
                                                int SH, int SW, int RS, int PW, int rows, int cols) {
  const int TH = blockDim.y;
  const int tid = threadIdx.y * TW + threadIdx.x;
  const int nthreads = TW * TH;
  const int KK = KH * KW;
  const real_t* tin = tile + (threadIdx.y * SH) * RS + threadIdx.x;
  const int slot_off = TH * SH * RS;  // the tile offset between the thread's two output rows (ty, ty + TH)
  const int yslot = TH * OW;
  for (int f0 = g0; f0 < g1;) {
    const int left = g1 - f0;
    const int FT = left > 4 ? 8 : (left > 2 ? 4 : 2);  // block-uniform
    const int nf = min(FT, left);
    __syncthreads();  // the tile is written; the previous pass's weights are no longer read
    for (int j = tid; j < KK * FT; j += nthreads) {
      const int f = j % FT;
      const int k = j / FT;
      wsh[j] = f < nf ? __ldg(spatial + (size_t)order[f0 + f] * KK + k) : real_t(0);
    }
    __syncthreads();
    if (rows > 0 && cols > 0) {
      if (FT == 8) {
#pragma unroll
        for (int s = 0; s < NPCONV_MONO_RY; ++s)
          if (s < rows)
            npc_mono_pass<8, 1, TW>(tin + s * slot_off, 0, wsh, KH, KW, SW, RS, PW, nf, order + f0, bias, has_bias,
                                    yout + s * yslot, 0, P, 1, cols);
      } else if (FT == 4) {
        npc_mono_pass<4, 2, TW>(tin, slot_off, wsh, KH, KW, SW, RS, PW, nf, order + f0, bias, has_bias, yout, yslot,
                                P, rows, cols);
      } else {
        npc_mono_pass<2, 2, TW>(tin, slot_off, wsh, KH, KW, SW, RS, PW, nf, order + f0, bias, has_bias, yout, yslot,
                                P, rows, cols);
      }
    }
    f0 += nf;
  }
}

// Monochromatic conv.
//   x (N, C, H, W); T (C', C) colours; spatial (F, KH*KW); order (F,): the filters sorted by colour;
//   starts (C'+1,): the filters of colour p are order[starts[p] .. starts[p+1]-1]; bias (F,) when has_bias.
//   y (N, F, OH, OW). Zero padding PT/PL at the top/left (bottom/right padding only enters through OH/OW).
// Launch: block (TW, TH) with TW in {8, 16, 32} and TW*TH <= 256; grid (tiles_h * tiles_w, C' * splits, N),
// N <= 65535 (ops_lowrank launches one grid per 65535 images). A block computes an output tile of NPCONV_MONO_RY*TH
// rows x NPCONV_MONO_RX*TW columns of one image, for one share of the filters of one colour: blockIdx.y = p * splits
// + s takes colour p's filters from s * per on, per = ceil(count / splits) rounded up to a multiple of
// NPCONV_MONO_SHARE, so that a share is whole 8- and 4-filter passes (splits > 1 spreads a small batch over more
// blocks; a share past the colour's last filter leaves).
// Thread (tx, ty) computes rows ty and ty + TH of the tile, columns tx + r * TW (r < NPCONV_MONO_RX).
// Dynamic shared memory, in real_t elements: KH*KW*NPCONV_MONO_FT (the weights of one pass; first, so 16-byte
// aligned) + TIH * RS (the colour tile). TIH = (RY*TH - 1)*SH + KH rows; a row holds TIW = (RX*TW - 1)*SW + KW
// colour values de-interleaved by column phase, column q at (q % SW) * PW + q / SW with PW = ceil(TIW / SW), so
// the 32 threads of a warp read 32 consecutive words at any column stride. RS >= SW * PW is the row stride;
// ops_lowrank pads it so that SH * RS = TW (mod 32) where it can, which keeps a warp that spans several rows of
// threads (TW < 32) free of bank conflicts too.
// __launch_bounds__(256, 2): at most 256 threads, and registers for 2 such blocks per SM (up to 128 a thread);
// without the second figure ptxas may squeeze the 32 accumulators and the pass state into 64 registers and spill.
#define NPCONV_MONO_BOUNDS 256, 2
NPCONV_KERNEL_LB(mono_conv, NPCONV_MONO_BOUNDS)(const real_t* __restrict__ x, const real_t* __restrict__ T,
                                                const real_t* __restrict__ spatial, const int* __restrict__ order,
                                                const int* __restrict__ starts, const real_t* __restrict__ bias,
                                                real_t* __restrict__ y, int N, int C, int H, int W, int F, int KH,
                                                int KW, int SH, int SW, int PT, int PL, int OH, int OW,
                                                int tiles_w, int RS, int has_bias, int splits) {
  extern __shared__ __align__(16) unsigned char npconv_mono_smem[];
  const int TW = blockDim.x;
  const int TH = blockDim.y;
  const int TIH = (NPCONV_MONO_RY * TH - 1) * SH + KH;
  const int TIW = (NPCONV_MONO_RX * TW - 1) * SW + KW;
  const int PW = (TIW + SW - 1) / SW;
  real_t* wsh = reinterpret_cast<real_t*>(npconv_mono_smem);
  real_t* tile = wsh + KH * KW * NPCONV_MONO_FT;

  const int p = blockIdx.y / splits;
  const int n = blockIdx.z;
  const int first = starts[p];
  const int count = starts[p + 1] - first;
  const int per = ((count + splits - 1) / splits + NPCONV_MONO_SHARE - 1) / NPCONV_MONO_SHARE * NPCONV_MONO_SHARE;
  const int g0 = first + (blockIdx.y - p * splits) * per;
  const int g1 = min(first + count, g0 + per);
  if (g0 >= g1 || n >= N) return;  // no filter in this share: the whole block leaves before any barrier

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int oh0 = (blockIdx.x / tiles_w) * (NPCONV_MONO_RY * TH);  // the tile's first output row and column
  const int ow0 = (blockIdx.x % tiles_w) * (NPCONV_MONO_RX * TW);
  const size_t HW = (size_t)H * W;
  const size_t P = (size_t)OH * OW;

  // 1. the colour sum_c T[p, c] x[n, c] of the input the tile reads, zero outside the image
  {
    const int ih0 = oh0 * SH - PT;
    const int iw0 = ow0 * SW - PL;
    const real_t* xn = x + (size_t)n * C * HW;
    const real_t* Tp = T + (size_t)p * C;
    // tile column q = tx + i * TW is phase q % SW, index q / SW: stepping q by TW moves the index by TW / SW and
    // the phase by TW % SW, with a carry
    const int dq_j = TW / SW;
    const int dq_ph = TW - dq_j * SW;
    for (int r = ty; r < TIH; r += TH) {
      const int ih = ih0 + r;
      const bool row_ok = npc_inside(ih, H);
      real_t* trow = tile + r * RS;
      int ph = tx % SW;
      int j = tx / SW;
      for (int q = tx; q < TIW; q += TW) {
        const int iw = iw0 + q;
        real_t v = real_t(0);  // the colour of zero padding is zero
        if (row_ok && npc_inside(iw, W)) {
          const real_t* xp = xn + (size_t)ih * W + iw;
          if (C <= 4) {  // an RGB(A) first layer: the channel loop unrolled
#pragma unroll
            for (int c = 0; c < 4; ++c)
              if (c < C) v += __ldg(Tp + c) * __ldg(xp + c * HW);
          } else {
#pragma unroll 1
            for (int c = 0; c < C; ++c) v += __ldg(Tp + c) * __ldg(xp + c * HW);
          }
        }
        trow[ph * PW + j] = v;
        ph += dq_ph;
        j += dq_j;
        if (ph >= SW) {
          ph -= SW;
          ++j;
        }
      }
    }
  }

  // 2. the filter passes (the first barrier of each pass also publishes the tile)
  const int rows = OH - (oh0 + ty) <= 0 ? 0 : (OH - (oh0 + ty) <= TH ? 1 : 2);  // the thread's valid row slots
  const int cols = OW - (ow0 + tx);                                                // valid columns: r * TW < cols
  real_t* yout = y + (size_t)n * F * P + (size_t)(oh0 + ty) * OW + ow0 + tx;
  if (TW == 32)
    npc_mono_passes<32>(tile, wsh, spatial, order, g0, g1, bias, has_bias, yout, P, OW, KH, KW, SH, SW, RS, PW, rows,
                        cols);
  else if (TW == 16)
    npc_mono_passes<16>(tile, wsh, spatial, order, g0, g1, bias, has_bias, yout, P, OW, KH, KW, SH, SW, RS, PW, rows,
                        cols);
  else
    npc_mono_passes<8>(tile, wsh, spatial, order, g0, g1, bias, has_bias, yout, P, OW, KH, KW, SH, SW, RS, PW, rows,
                       cols);
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

// The 1x1 second stage of the low-rank conv, with its bias: y[n, f, p] = bias[f] + sum_{k < T} second[f, k] *
// h[n, k, p]; h (N, T, P), second (F, T), bias (F,) when has_bias, y (N, F, P).
// TB (T rounded up to 8, 16 or 32) and PIX (pixels a thread) are compile-time: a thread holds its PIX pixels' TB
// values of h in registers (zero past T and past P), loaded once, then writes one output a pixel for each of the
// block's filters. Pixels are blockDim.x apart, so each warp-wide load and store touches consecutive words; the
// weights of a filter are the same for the whole block (shared-memory broadcasts), PIX multiply-adds a weight read.
// Launch: 1-D blocks (at most 256 threads), grid (ceil(P / (PIX * blockDim.x)), ceil(F / FB), images), at most
// 65535 images a launch (ops_lowrank launches one grid per 65535); block y takes filters [y * FB, min(F, y * FB +
// FB)). Dynamic shared memory: FB * TB weights (zero past T) then FB biases (zero without a bias), real_t.
template <int TB, int PIX>
__device__ __forceinline__ void npc_lr_expand(const real_t* __restrict__ h, const real_t* __restrict__ second,
                                              const real_t* __restrict__ bias, real_t* __restrict__ y, int N, int T,
                                              int F, int P, int FB, int has_bias) {
  extern __shared__ __align__(16) unsigned char npconv_lr_smem[];
  real_t* wsh = reinterpret_cast<real_t*>(npconv_lr_smem);
  real_t* bsh = wsh + FB * TB;
  const int f0 = blockIdx.y * FB;
  const int fcount = min(FB, F - f0);
  const int n = blockIdx.z;
  for (int j = threadIdx.x; j < FB * TB; j += blockDim.x) {
    const int f = j / TB;
    const int k = j - f * TB;
    wsh[j] = (f < fcount && k < T) ? __ldg(second + (size_t)(f0 + f) * T + k) : real_t(0);
  }
  for (int f = threadIdx.x; f < FB; f += blockDim.x)
    bsh[f] = (has_bias && f < fcount) ? __ldg(bias + f0 + f) : real_t(0);
  __syncthreads();
  if (n >= N || fcount <= 0) return;  // after the only barrier

  const int p0 = blockIdx.x * (PIX * blockDim.x) + threadIdx.x;
  real_t hv[TB][PIX];
  const real_t* hn = h + (size_t)n * T * P;
#pragma unroll
  for (int k = 0; k < TB; ++k) {
#pragma unroll
    for (int j = 0; j < PIX; ++j) {
      const int p = p0 + j * blockDim.x;
      hv[k][j] = (k < T && p < P) ? __ldg(hn + (size_t)k * P + p) : real_t(0);
    }
  }
  real_t* yn = y + ((size_t)n * F + f0) * P;
  for (int f = 0; f < fcount; ++f) {
    real_t acc[PIX];
#pragma unroll
    for (int j = 0; j < PIX; ++j) acc[j] = bsh[f];
    const real_t* wf = wsh + f * TB;
#pragma unroll
    for (int k = 0; k < TB; ++k) {
      const real_t wk = wf[k];
#pragma unroll
      for (int j = 0; j < PIX; ++j) acc[j] += wk * hv[k][j];
    }
    real_t* yf = yn + (size_t)f * P;
#pragma unroll
    for (int j = 0; j < PIX; ++j) {
      const int p = p0 + j * blockDim.x;
      if (p < P) yf[p] = acc[j];
    }
  }
}

#define NPCONV_LR_EXPAND(TB, PIX)                                                                                  \
  NPCONV_KERNEL_LB(lr_expand##TB, 256)(const real_t* __restrict__ h, const real_t* __restrict__ second,          \
                                       const real_t* __restrict__ bias, real_t* __restrict__ y, int N, int T, int F, \
                                       int P, int FB, int has_bias) {                                               \
    npc_lr_expand<TB, PIX>(h, second, bias, y, N, T, F, P, FB, has_bias);                                          \
  }
NPCONV_LR_EXPAND(8, 4)
NPCONV_LR_EXPAND(16, 4)
NPCONV_LR_EXPAND(32, 2)

// The whole low-rank conv: y[n, f] = bias[f] + sum_{k < T} second[f, k] * (first[k] * x[n])(pixel), with first
// (T, C, KH, KW) applied as a direct conv (strides, zero padding PT/PL, dilation), second (F, T), bias (F,) when
// has_bias; x (N, C, H, W), y (N, F, OH, OW). TB (T rounded up to 8, 16 or 32) and PIX (output pixels a thread: 1,
// or 2 for large grids, where sharing each tap's index arithmetic and weight loads between two pixels pays) are
// compile-time.
// Launch: 1-D blocks (at most 256 threads), grid ceil(N * OH * OW / (PIX * blockDim.x)); the pixels of the whole
// batch are numbered i = n * OH * OW + p, and block b's thread x takes i = b * PIX * blockDim.x + j * blockDim.x + x
// for j < PIX (so each store of a warp is to consecutive words); N * OH * OW < 2^31 - 2^26. A pixel's TB first-stage
// values stay in registers (those past T are zero).
// Dynamic shared memory (reused by the two phases, with barriers reached by every thread): max(ceil(CC * KH * KW /
// NPCONV_LRC_UNROLL) * NPCONV_LRC_UNROLL * TB, FC * (TB + 1)) real_t.
//   phase 1, per chunk of CC input channels: their first-stage weights laid out [tap][TB] (taps k = (c - c0) * KH *
//            KW + kh * KW + kw, zero for filters past T and taps past the chunk's last, up to a multiple of
//            NPCONV_LRC_UNROLL); a thread loads NPCONV_LRC_UNROLL taps of its pixels before their multiply-adds, so
//            that several loads are in flight when few threads are (a small batch);
//   phase 2, per chunk of FC filters: second [f][TB] (zero past T), then the chunk's FC biases (zero without).
template <int TB, int PIX>
__device__ __forceinline__ void npc_lr_conv(const real_t* __restrict__ x, const real_t* __restrict__ first,
                                           const real_t* __restrict__ second, const real_t* __restrict__ bias,
                                           real_t* __restrict__ y, int N, int C, int H, int W, int T, int F, int KH,
                                           int KW, int SH, int SW, int PT, int PL, int DH, int DW, int OH, int OW,
                                           int CC, int FC, int has_bias) {
  extern __shared__ __align__(16) unsigned char npconv_lrc_smem[];
  real_t* sh = reinterpret_cast<real_t*>(npconv_lrc_smem);
  const int U = NPCONV_LRC_UNROLL;
  const int KK = KH * KW;
  const int P = OH * OW;
  const size_t HW = (size_t)H * W;
  bool active[PIX];
  int ih0[PIX], iw0[PIX];
  size_t xoff[PIX], yoff[PIX];  // x at the pixel's image; y at its image and pixel
#pragma unroll
  for (int j = 0; j < PIX; ++j) {
    const int i = blockIdx.x * (PIX * blockDim.x) + j * blockDim.x + threadIdx.x;
    active[j] = i < N * P;
    const int n = active[j] ? i / P : 0;
    const int pix = active[j] ? i - n * P : 0;
    const int oh = pix / OW;
    const int ow = pix - oh * OW;
    ih0[j] = oh * SH - PT;
    iw0[j] = ow * SW - PL;
    xoff[j] = (size_t)n * C * HW;
    yoff[j] = (size_t)n * F * P + pix;
  }
  real_t acc[TB][PIX];
#pragma unroll
  for (int k = 0; k < TB; ++k)
#pragma unroll
    for (int j = 0; j < PIX; ++j) acc[k][j] = real_t(0);

  // phase 1: the first stage, a chunk of input channels at a time
  for (int c0 = 0; c0 < C; c0 += CC) {
    const int taps = min(CC, C - c0) * KK;
    const int padded = (taps + U - 1) / U * U;
    __syncthreads();  // the previous chunk's weights are no longer read
    for (int e = threadIdx.x; e < padded * TB; e += blockDim.x) {
      const int k = e % TB;
      const int tap = e / TB;
      sh[e] = (k < T && tap < taps) ? __ldg(first + ((size_t)k * C + c0) * KK + tap) : real_t(0);
    }
    __syncthreads();
    const real_t* xc = x + (size_t)c0 * HW;
    int c = 0, kh = 0, kw = 0;  // the next tap to load
    for (int j0 = 0; j0 < padded; j0 += U) {
      real_t v[NPCONV_LRC_UNROLL][PIX];
#pragma unroll
      for (int u = 0; u < NPCONV_LRC_UNROLL; ++u) {
#pragma unroll
        for (int j = 0; j < PIX; ++j) v[u][j] = real_t(0);
        if (j0 + u < taps) {
#pragma unroll
          for (int j = 0; j < PIX; ++j) {
            const int ih = ih0[j] + kh * DH;
            const int iw = iw0[j] + kw * DW;
            if (active[j] && npc_inside(ih, H) && npc_inside(iw, W))
              v[u][j] = __ldg(xc + xoff[j] + c * HW + (size_t)ih * W + iw);
          }
          if (++kw == KW) {
            kw = 0;
            if (++kh == KH) {
              kh = 0;
              ++c;
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < NPCONV_LRC_UNROLL; ++u) {
        const real_t* wk = sh + (j0 + u) * TB;
#pragma unroll
        for (int k = 0; k < TB; ++k) {
          const real_t wv = wk[k];
#pragma unroll
          for (int j = 0; j < PIX; ++j) acc[k][j] += v[u][j] * wv;
        }
      }
    }
  }

  // phase 2: the 1x1 stage with the bias, a chunk of filters at a time
  for (int f0 = 0; f0 < F; f0 += FC) {
    const int fc = min(FC, F - f0);
    __syncthreads();  // phase 1's weights, or the previous chunk, are no longer read
    for (int e = threadIdx.x; e < fc * TB; e += blockDim.x) {
      const int f = e / TB;
      const int k = e - f * TB;
      sh[e] = k < T ? __ldg(second + (size_t)(f0 + f) * T + k) : real_t(0);
    }
    for (int f = threadIdx.x; f < fc; f += blockDim.x) sh[fc * TB + f] = has_bias ? __ldg(bias + f0 + f) : real_t(0);
    __syncthreads();
    for (int f = 0; f < fc; ++f) {
      const real_t* sf = sh + f * TB;
      real_t o[PIX];
#pragma unroll
      for (int j = 0; j < PIX; ++j) o[j] = sh[fc * TB + f];
#pragma unroll
      for (int k = 0; k < TB; ++k) {
        const real_t sv = sf[k];
#pragma unroll
        for (int j = 0; j < PIX; ++j) o[j] += sv * acc[k][j];
      }
#pragma unroll
      for (int j = 0; j < PIX; ++j)
        if (active[j]) y[yoff[j] + (size_t)(f0 + f) * P] = o[j];
    }
  }
}

// lr_conv<TB> takes one pixel a thread, lr_conv<TB>_px2 two (not for TB = 32: 64 accumulators of double spill)
#define NPCONV_LR_CONV(TB, PIX, NAME)                                                                              \
  NPCONV_KERNEL_LB_MIN(NAME, 256, 2)(const real_t* __restrict__ x, const real_t* __restrict__ first,              \
                                     const real_t* __restrict__ second, const real_t* __restrict__ bias,          \
                                     real_t* __restrict__ y, int N, int C, int H, int W, int T, int F, int KH,      \
                                     int KW, int SH, int SW, int PT, int PL, int DH, int DW, int OH, int OW,        \
                                     int CC, int FC, int has_bias) {                                                \
    npc_lr_conv<TB, PIX>(x, first, second, bias, y, N, C, H, W, T, F, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, CC,  \
                         FC, has_bias);                                                                             \
  }
NPCONV_LR_CONV(8, 1, lr_conv8)
NPCONV_LR_CONV(16, 1, lr_conv16)
NPCONV_LR_CONV(32, 1, lr_conv32)
NPCONV_LR_CONV(8, 2, lr_conv8_px2)
NPCONV_LR_CONV(16, 2, lr_conv16_px2)

// The whole separable conv: h[k] = vertical[k] * x (X x 1 taps, row stride SH, zero padding PT at the top; rows
// only), then y[f] = bias[f] + sum_k horizontal[f, k] * h[k] (1 x Y taps, column stride SW, zero padding PL at the
// left); x (N, C, H, W), vertical (K, C, X), horizontal (F, K, Y), bias (F,) when has_bias, y (N, F, OH, OW).
// KB (K rounded up to 4, 8 or 16) is compile-time.
// Launch: 1-D blocks of NPCONV_SEP_TC * TR threads (TR = blockDim.x / NPCONV_SEP_TC rows of the output tile, at most
// 256 threads), grid (ceil(OH / TR) * tiles_w, N, ceil(F / FS)) with tiles_w = ceil(OW / NPCONV_SEP_TC), at most
// 65535 images a launch. A block computes an output tile of TR rows x NPCONV_SEP_TC columns for the filters
// [blockIdx.z * FS, min(F, (blockIdx.z + 1) * FS)) (FS < F: blocks share the filters, each computing the tile's K
// maps; a small grid's way to more threads); thread (r, j) = (x / TC, x % TC) one output pixel of it.
// Dynamic shared memory, real_t (every part starts at a multiple of 4 elements, so the rows of 4 read below are
// aligned): K * Y * NPCONV_SEP_FT horizontal weights of one pass of NPCONV_SEP_FT filters [k][y][f] (zero past the
// share's last filter), NPCONV_SEP_FT biases, C * X * KB vertical weights [c][x][k] (zero past K), then KB * TR * HW
// values of the K maps the tile reads ([k][r][q], HW = (TC - 1) * SW + Y columns from ow0 * SW - PL; zero outside
// the image's columns and past OH).
//   phase 1: the h tile, each thread a (row, column) of it at a time, KB accumulators;
//   phase 2: per pass of NPCONV_SEP_FT filters, the weights into shared memory, then each thread its pixel's
//            NPCONV_SEP_FT outputs (each h value read once a pass, the weights as shared-memory broadcasts).
struct __align__(16) npc_sep_row4 { real_t v[4]; };

// acc[i] += v * w[i] for i < NA (a multiple of 4), w a 16-byte aligned row in shared memory read 4 values at a time
template <int NA>
__device__ __forceinline__ void npc_sep_axpy(real_t (&acc)[NA], real_t v, const real_t* w) {
#pragma unroll
  for (int i4 = 0; i4 < NA / 4; ++i4) {
    const npc_sep_row4 w4 = reinterpret_cast<const npc_sep_row4*>(w)[i4];
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[4 * i4 + u] += v * w4.v[u];
  }
}

template <int KB>
__device__ __forceinline__ void npc_sep_conv(const real_t* __restrict__ x, const real_t* __restrict__ vert,
                                            const real_t* __restrict__ horiz, const real_t* __restrict__ bias,
                                            real_t* __restrict__ y, int N, int C, int H, int W, int K, int F, int X,
                                            int Y, int SH, int SW, int PT, int PL, int OH, int OW, int tiles_w,
                                            int has_bias, int FS) {
  extern __shared__ __align__(16) unsigned char npconv_sep_smem[];
  const int TC = NPCONV_SEP_TC;
  const int FT = NPCONV_SEP_FT;
  const int TR = blockDim.x / TC;
  const int HWc = (TC - 1) * SW + Y;
  real_t* wsh = reinterpret_cast<real_t*>(npconv_sep_smem);
  real_t* bsh = wsh + K * Y * FT;
  real_t* vsh = bsh + FT;
  real_t* hsh = vsh + C * X * KB;
  const int n = blockIdx.y;
  const int oh0 = (blockIdx.x / tiles_w) * TR;
  const int ow0 = (blockIdx.x % tiles_w) * TC;
  const int q0 = ow0 * SW - PL;  // the image column of the tile's first h column
  const size_t HWsz = (size_t)H * W;
  const real_t* xn = x + (size_t)n * C * HWsz;

  for (int e = threadIdx.x; e < C * X * KB; e += blockDim.x) {
    const int k = e % KB;
    const int cx = e / KB;  // c * X + xx
    vsh[e] = k < K ? __ldg(vert + (size_t)k * C * X + cx) : real_t(0);
  }
  __syncthreads();

  // phase 1: the tile's K maps, TR rows x HWc columns
  for (int e = threadIdx.x; e < TR * HWc; e += blockDim.x) {
    const int r = e / HWc;
    const int q = e - r * HWc;
    const int oh = oh0 + r;
    const int iw = q0 + q;
    real_t acc[KB];
#pragma unroll
    for (int k = 0; k < KB; ++k) acc[k] = real_t(0);
    if (oh < OH && npc_inside(iw, W)) {
      const int ih0 = oh * SH - PT;
      const real_t* wv = vsh;
      for (int c = 0; c < C; ++c) {
        const real_t* xc = xn + c * HWsz + iw;
        for (int xx = 0; xx < X; ++xx, wv += KB) {
          const int ih = ih0 + xx;
          npc_sep_axpy<KB>(acc, npc_inside(ih, H) ? __ldg(xc + (size_t)ih * W) : real_t(0), wv);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < KB; ++k) hsh[(k * TR + r) * HWc + q] = acc[k];
  }

  // phase 2: passes of FT filters; the first barrier of a pass also publishes the h tile
  const int r = threadIdx.x / TC;
  const int j = threadIdx.x - r * TC;
  const int oh = oh0 + r;
  const int ow = ow0 + j;
  const bool active = oh < OH && ow < OW;
  const size_t P = (size_t)OH * OW;
  real_t* yp = y + (size_t)n * F * P + (size_t)oh * OW + ow;
  const int f_end = min(F, (blockIdx.z + 1) * FS);  // the block's share of the filters
  for (int f0 = blockIdx.z * FS; f0 < f_end; f0 += FT) {
    __syncthreads();  // the h tile is complete; the previous pass's weights are no longer read
    for (int e = threadIdx.x; e < K * Y * FT; e += blockDim.x) {
      const int f = e % FT;
      const int ky = e / FT;  // k * Y + yy
      wsh[e] = f0 + f < f_end ? __ldg(horiz + (size_t)(f0 + f) * K * Y + ky) : real_t(0);
    }
    for (int f = threadIdx.x; f < FT; f += blockDim.x)
      bsh[f] = (has_bias && f0 + f < f_end) ? __ldg(bias + f0 + f) : real_t(0);
    __syncthreads();
    if (active) {
      real_t acc[NPCONV_SEP_FT];
#pragma unroll
      for (int f = 0; f < NPCONV_SEP_FT; ++f) acc[f] = bsh[f];
      const real_t* wk = wsh;
      for (int k = 0; k < K; ++k) {
        const real_t* hr = hsh + (k * TR + r) * HWc + j * SW;
        for (int yy = 0; yy < Y; ++yy, wk += NPCONV_SEP_FT) npc_sep_axpy<NPCONV_SEP_FT>(acc, hr[yy], wk);
      }
#pragma unroll
      for (int f = 0; f < NPCONV_SEP_FT; ++f)
        if (f0 + f < f_end) yp[(size_t)(f0 + f) * P] = acc[f];
    }
  }
}

#define NPCONV_SEP_CONV(KB)                                                                                        \
  NPCONV_KERNEL_LB_MIN(sep_conv##KB, 256, 2)(const real_t* __restrict__ x, const real_t* __restrict__ vert,       \
                                      const real_t* __restrict__ horiz, const real_t* __restrict__ bias,          \
                                      real_t* __restrict__ y, int N, int C, int H, int W, int K, int F, int X,     \
                                      int Y, int SH, int SW, int PT, int PL, int OH, int OW, int tiles_w,           \
                                      int has_bias, int FS) {                                                       \
    npc_sep_conv<KB>(x, vert, horiz, bias, y, N, C, H, W, K, F, X, Y, SH, SW, PT, PL, OH, OW, tiles_w, has_bias,   \
                     FS);                                                                                           \
  }
NPCONV_SEP_CONV(4)
NPCONV_SEP_CONV(8)
NPCONV_SEP_CONV(16)
