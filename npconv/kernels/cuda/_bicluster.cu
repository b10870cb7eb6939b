// Kernels of the biclustered factored layers (npconv.functional.bicluster on CuPy arrays). They are launched by
// npconv.kernels.cuda.ops_bicluster from its own table (ops_bicluster.LAUNCH_SIGNATURES). The leading underscore
// keeps this file out of loader.source_names(), the sources of ops.py's table; ops_bicluster builds it with the
// same prelude and #defines.
//
// Layouts shared by the kernels (one chunk of m images at a time; P = OH*OW output pixels per image):
//   * input groups: the channels of group g are in_perm[in_off[g] .. in_off[g+1]-1] ("permuted order");
//   * Z, the input of the expansion GEMMs: Z[(h*G + g)*K + k][n*P + p], so the rows of output group h are one
//     contiguous (G*K, m*P) matrix and the expansion of group h is the GEMM expand_h (F_h, G*K) @ Z_h;
//   * the GEMM result of output group h, r (F_h, m*P), is written to NCHW by bic_scatter through out_perm.
//
//  * bic_cp_front       -- CP form, fused: gathers a group's channels through in_perm, the C_g -> 1 reduction of
//                          KC components and the vertical X x 1 pass (row stride) of each, a column a thread in
//                          registers, then the horizontal 1 x Y pass (column stride) from shared memory; writes Z.
//  * bic_gather         -- SVD form: x gathered through in_perm into a channel-major matrix xg[j][n*H*W + s], so
//                          each group's C_g -> H*K1 reduction is one GEMM on contiguous rows.
//  * bic_svd_spatial    -- SVD form: the K1 -> K2 X x Y conv of every block (g, h), direct (no im2col matrix),
//                          from the reduction's output to Z (bic_svd_spatial_split: for small batches, the K1
//                          channels split among blocks).
//  * bic_shared_filter  -- shared separable form: every input channel filtered by each shared filter its group
//                          uses (vertical then horizontal pass), once: Q rows.
//  * bic_shared_combine -- shared separable form: component (g, h, k) = sum_j reduce[j, h, k] * Q[j, slot]: Z.
//  * bic_scatter        -- r (F_h, m*P) to y (m, F, P) at channels out_perm[o0 + f], adding the bias.
//  * bic_expand         -- for few columns (batch 1): the expansion of every output group and the scatter, fused
//                          in one launch (tiles of npc_tile_gemm, below), instead of a GEMM and a bic_scatter a group.
//  * bic_expand_shared  -- shared separable form, for few columns: bic_shared_combine and bic_expand in one launch.
//  * bic_reduce         -- SVD form, for few columns (batch 1): the gather and every input group's reduction in
//                          one launch (tiles of npc_tile_gemm), instead of bic_gather and a GEMM a group.

#define NPCONV_BIC_TH 8   // most output rows of a bic_cp_front tile (a column's outputs held in registers)
#define NPCONV_BIC_FT 16  // filters per bic_svd_spatial block (accumulators held in registers)

// CP front end.
//   x (m, C, H, W); in_perm (C,), in_off (G+1,); reduce (C, NH*K) rows in permuted order; vertical (G, NH*K, X);
//   horizontal (G, NH*K, Y); z (NH*G*K, m*P) as in the header. Zero padding PT/PL at the top/left (the
//   bottom/right padding only enters through OH/OW).
// Launch: 1-D blocks of at least one thread and at most 256; a tile of TH x TW output pixels (TH <= NPCONV_BIC_TH);
// grid (tiles_h * tiles_w, G * kchunks, z) where kchunks = ceil(NH*K / KC): block (tile, g, chunk) computes
// components q0 .. q0+KC-1 (q = h*K + k) of group g for its tile, looping over images blockIdx.z, + gridDim.z, ...
// (the host takes z = ceil(m / ops_bicluster.CP_IMAGES_PER_BLOCK), at most 65535, so that the weights staged below
// serve several images). The host picks KC so that KC * TIW threads cover the tile's input columns
// (TIW = (TW-1)*SW + Y, TIH = (TH-1)*SH + X).
// Two phases an image:
//   A. one thread per (component i, input column c): the group's reduction of that column, over the TIH rows the
//      tile needs (each channel's rows loaded at once into registers), then the vertical X x 1 pass (row stride)
//      of the column in registers, TH values to vs[i][o][c] in shared memory;
//   B. one thread per output pixel, each component: the horizontal 1 x Y pass (column stride) from vs, into Z.
// The first version reduced into a shared tile and then ran each pass from shared memory; on an H100 (ZF conv2,
// CP K=12, batch 128) it took 70% of the layer's kernel time, its reduction a chain of dependent global loads.
// Dynamic shared memory, in this order:
//   real_t: KC * X (vertical taps), KC * Y (horizontal taps), KC * cg (reduction weights wr[j*KC + i]; cg = the
//           group's size), KC * TH * TIW (vs), rounded up to an even count;
//   long long: cg (the offsets of the group's channels in an image).
// The host sizes it for the largest group (the layout grows with cg).
// Common (X, row stride) pairs have entry points of their own, bic_cp_front_x<X>s<SH>, which hold a column's rows
// in registers (npc_cp_column_regs<X, SH>); bic_cp_front takes any other X and stride and accumulates the TH outputs
// row by row (npc_cp_column_rows).

// s = sum_t w[t] * src[t * step], t < T (unrolled, taps in registers) or t < n when T == 0
template <int T>
__device__ __forceinline__ real_t npc_cp_taps(const real_t* w, const real_t* src, int step, int n) {
  real_t s = real_t(0);
  if (T > 0) {
#pragma unroll
    for (int t = 0; t < (T > 0 ? T : 1); ++t) s += w[t] * src[t * step];
  } else {
    for (int t = 0; t < n; ++t) s += w[t] * src[t * step];
  }
  return s;
}

// phase A for component i and input column iw of image xn, any column: vcol[o * TIW] for o < TH, the vertical pass
// of red[r] = sum_j wr[j*KC + i] * x[channel j][ih0 + r][iw], r < TIH (zero outside the image), row by row
__device__ __forceinline__ void npc_cp_column_rows(const real_t* __restrict__ xn, const long long* choff,
                                                   const real_t* wr, const real_t* wv, real_t* vcol, int cg, int KC,
                                                   int i, int X, int SH, int TH, int TIW, int H, int W, int ih0,
                                                   int iw) {
  const int TIH = (TH - 1) * SH + X;
  real_t acc[NPCONV_BIC_TH];
#pragma unroll
  for (int o = 0; o < NPCONV_BIC_TH; ++o) acc[o] = real_t(0);
  for (int r = 0; r < TIH && npc_inside(iw, W); ++r) {
    const int ih = ih0 + r;
    if (!npc_inside(ih, H)) continue;
    real_t red = real_t(0);
    for (int j = 0; j < cg; ++j) red += wr[j * KC + i] * __ldg(xn + choff[j] + (size_t)ih * W + iw);
#pragma unroll
    for (int o = 0; o < NPCONV_BIC_TH; ++o) {
      const int t = r - o * SH;  // the tap of input row r in output row o
      if (o < TH && t >= 0 && t < X) acc[o] += wv[i * X + t] * red;
    }
  }
#pragma unroll
  for (int o = 0; o < NPCONV_BIC_TH; ++o)
    if (o < TH) vcol[o * TIW] = acc[o];
}

// the same for X = XT taps at row stride SHT: each channel's R = (NPCONV_BIC_TH-1)*SHT + XT loads issued at once
// (rows outside the image skipped), the R sums and the vertical pass in registers (rows past the tile's TIH when
// TH < NPCONV_BIC_TH are computed and not used)
template <int XT, int SHT>
__device__ __forceinline__ void npc_cp_column_regs(const real_t* __restrict__ xn, const long long* choff,
                                                   const real_t* wr, const real_t* wv, real_t* vcol, int cg, int KC,
                                                   int i, int TH, int TIW, int H, int W, int ih0, int iw) {
  constexpr int R = (NPCONV_BIC_TH - 1) * SHT + XT;
  real_t red[R];
#pragma unroll
  for (int r = 0; r < R; ++r) red[r] = real_t(0);
  const int r_lo = max(0, -ih0);                               // rows r_lo .. r_hi-1 are inside the image,
  const int r_hi = npc_inside(iw, W) ? min(R, H - ih0) : 0;    // none in a column outside it: bit r of rows
  const unsigned rows = r_hi > r_lo ? ((r_hi - r_lo < 32 ? (1u << (r_hi - r_lo)) : 0u) - 1u) << r_lo : 0u;
#pragma unroll 1
  for (int j = 0; j < cg; ++j) {
    const real_t w = wr[j * KC + i];
    const real_t* xp = xn + choff[j] + (long long)ih0 * W + iw;  // row r at xp + r * W (a running pointer)
#pragma unroll
    for (int r = 0; r < R; ++r, xp += W)
      if (rows & (1u << r)) red[r] += w * __ldg(xp);  // (one mask, not R predicates held over the loop)
  }
  real_t wt[XT];
#pragma unroll
  for (int t = 0; t < XT; ++t) wt[t] = wv[i * XT + t];
#pragma unroll
  for (int o = 0; o < NPCONV_BIC_TH; ++o) {
    real_t s = real_t(0);
#pragma unroll
    for (int t = 0; t < XT; ++t) s += wt[t] * red[o * SHT + t];
    if (o < TH) vcol[o * TIW] = s;
  }
}

// phase B for the output pixel (o, ow) of the tile: components i0 .. i0+run-1 from vs (KC x TH x TIW) into Z rows
// zc, zc + zstride, ...
template <int T>
__device__ __forceinline__ void npc_cp_horizontal(const real_t* vs, const real_t* wh, real_t* zc, size_t zstride,
                                                  int run, int Y, int TVT, int TIW, int o, int ow, int SW) {
  const real_t* src = vs + o * TIW + ow * SW;
  for (int i = 0; i < run; ++i, src += TVT, zc += zstride) {
    if (T > 0) {
      real_t w[T > 0 ? T : 1];
#pragma unroll
      for (int t = 0; t < (T > 0 ? T : 1); ++t) w[t] = wh[i * Y + t];
      *zc = npc_cp_taps<T>(w, src, 1, Y);
    } else {
      *zc = npc_cp_taps<0>(wh + i * Y, src, 1, Y);
    }
  }
}

// The parameters of every entry point (above), and the arguments passing them on
#define NPC_CP_PARAMS                                                                                          \
  const real_t* __restrict__ x, const int* __restrict__ in_perm, const int* __restrict__ in_off,               \
      const real_t* __restrict__ reduce, const real_t* __restrict__ vertical,                                  \
      const real_t* __restrict__ horizontal, real_t* __restrict__ z, int m, int C, int H, int W, int G, int NH, \
      int K, int X, int Y, int SH, int SW, int PT, int PL, int OH, int OW, int TW, int TH, int KC, int tiles_w, \
      int kchunks
#define NPC_CP_ARGS x, in_perm, in_off, reduce, vertical, horizontal, z, m, C, H, W, G, NH, K, X, Y, SH, SW, PT, PL, \
    OH, OW, TW, TH, KC, tiles_w, kchunks

// The kernel body, for a column of X = XT taps at row stride SHT (0, 0: any X and stride)
template <int XT, int SHT>
__device__ __forceinline__ void npc_cp_front(NPC_CP_PARAMS) {
  extern __shared__ __align__(16) unsigned char npconv_bic_cp_smem[];
  const int TIW = (TW - 1) * SW + Y;
  const int TVT = TH * TIW;  // one component's tile after the vertical pass

  const int HK = NH * K;
  const int g = blockIdx.y / kchunks;
  const int q0 = (blockIdx.y - g * kchunks) * KC;
  const int nq = min(KC, HK - q0);
  const int i0 = in_off[g];
  const int cg = in_off[g + 1] - i0;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int tile_r = blockIdx.x / tiles_w;
  const int tile_c = blockIdx.x - tile_r * tiles_w;
  const int ih0 = tile_r * TH * SH - PT;
  const int iw0 = tile_c * TW * SW - PL;
  const size_t HW = (size_t)H * W;
  const size_t P = (size_t)OH * OW;
  const size_t ldz = (size_t)m * P;

  real_t* wv = reinterpret_cast<real_t*>(npconv_bic_cp_smem);  // wv[i * X + t]
  real_t* wh = wv + KC * X;                                      // wh[i * Y + t]
  real_t* wr = wh + KC * Y;                                      // wr[j * KC + i], j < cg
  real_t* vs = wr + KC * cg;                                     // vs[(i * TH + o) * TIW + c]
  size_t reals = (size_t)KC * (X + Y + cg + TVT);                // the offsets follow, 8-byte aligned
  reals += reals & 1;
  long long* choff = reinterpret_cast<long long*>(npconv_bic_cp_smem + reals * sizeof(real_t));

  // the block's weights: spatial taps and reduction (zero past the last component), channel offsets
  for (int j = tid; j < KC * X; j += nthreads) {
    const int i = j / X;
    wv[j] = i < nq ? __ldg(vertical + ((size_t)g * HK + q0 + i) * X + (j - i * X)) : real_t(0);
  }
  for (int j = tid; j < KC * Y; j += nthreads) {
    const int i = j / Y;
    wh[j] = i < nq ? __ldg(horizontal + ((size_t)g * HK + q0 + i) * Y + (j - i * Y)) : real_t(0);
  }
  for (int j = tid; j < KC * cg; j += nthreads) {
    const int c = j / KC;
    const int i = j - c * KC;
    wr[j] = i < nq ? __ldg(reduce + (size_t)(i0 + c) * HK + q0 + i) : real_t(0);
  }
  for (int c = tid; c < cg; c += nthreads) choff[c] = (long long)__ldg(in_perm + i0 + c) * (long long)HW;
  __syncthreads();

#pragma unroll 1  // (the image loop: one copy of the body, as measured)
  for (int n = blockIdx.z; n < m; n += gridDim.z) {
    const real_t* xn = x + (size_t)n * C * HW;
    // A. a thread per (component, input column); vs of the previous image was last read before the barrier that
    //    ends the previous iteration
    for (int j = tid; j < nq * TIW; j += nthreads) {
      const int i = j / TIW;
      const int c = j - i * TIW;
      real_t* vcol = vs + i * TVT + c;
      const int iw = iw0 + c;
      if (XT > 0)
        npc_cp_column_regs<(XT > 0 ? XT : 1), (SHT > 0 ? SHT : 1)>(xn, choff, wr, wv, vcol, cg, KC, i, TH, TIW, H, W,
                                                                   ih0, iw);
      else
        npc_cp_column_rows(xn, choff, wr, wv, vcol, cg, KC, i, X, SH, TH, TIW, H, W, ih0, iw);
    }
    __syncthreads();  // vs written
    // B. a thread per output pixel; component q = h*K + k to its Z row. Rows of consecutive components differ by
    //    ldz within an output group h; the groups are G*K rows apart.
    for (int p = tid; p < TH * TW; p += nthreads) {
      const int o = p / TW;
      const int ow = p - o * TW;
      const int oh = tile_r * TH + o;
      const int owg = tile_c * TW + ow;
      if (oh >= OH || owg >= OW) continue;
      const size_t col = (size_t)n * P + (size_t)oh * OW + owg;
      for (int i = 0; i < nq;) {
        const int q = q0 + i;
        const int h = q / K;
        const int k = q - h * K;
        const int run = min(nq - i, K - k);  // components of this output group in the block
        real_t* zc = z + ((size_t)(h * G + g) * K + k) * ldz + col;
        const real_t* vi = vs + i * TVT;
        const real_t* whi = wh + i * Y;
        if (Y == 3) npc_cp_horizontal<3>(vi, whi, zc, ldz, run, Y, TVT, TIW, o, ow, SW);
        else if (Y == 5) npc_cp_horizontal<5>(vi, whi, zc, ldz, run, Y, TVT, TIW, o, ow, SW);
        else if (Y == 7) npc_cp_horizontal<7>(vi, whi, zc, ldz, run, Y, TVT, TIW, o, ow, SW);
        else npc_cp_horizontal<0>(vi, whi, zc, ldz, run, Y, TVT, TIW, o, ow, SW);
        i += run;
      }
    }
    __syncthreads();  // vs read; the next image may overwrite it
  }
}

// One entry point per specialisation: bic_cp_front (any X and stride) and bic_cp_front_x<X>s<SH>. At most 64
// registers a thread in float32 (4 blocks of 256 threads a multiprocessor), 128 in float64 (a column's partial sums
// take twice the registers).
#define NPC_CP_MIN_BLOCKS_f32 4
#define NPC_CP_MIN_BLOCKS_f64 2
#define NPC_CP_FRONT_KERNEL(base, XT, SHT)                                                        \
  NPCONV_KERNEL_LB_MIN(base, 256, NPCONV_JOIN(NPC_CP_MIN_BLOCKS, NPCONV_SFX))(NPC_CP_PARAMS) { \
    npc_cp_front<XT, SHT>(NPC_CP_ARGS);                                                            \
  }
NPC_CP_FRONT_KERNEL(bic_cp_front, 0, 0)
NPC_CP_FRONT_KERNEL(bic_cp_front_x3s1, 3, 1)
NPC_CP_FRONT_KERNEL(bic_cp_front_x3s2, 3, 2)
NPC_CP_FRONT_KERNEL(bic_cp_front_x5s1, 5, 1)
NPC_CP_FRONT_KERNEL(bic_cp_front_x5s2, 5, 2)
NPC_CP_FRONT_KERNEL(bic_cp_front_x7s1, 7, 1)
NPC_CP_FRONT_KERNEL(bic_cp_front_x7s2, 7, 2)
#undef NPC_CP_FRONT_KERNEL
#undef NPC_CP_ARGS
#undef NPC_CP_PARAMS

// x (m, C, H*W) gathered through perm into the channel-major xg (C, m*H*W): xg[j][n*HW + s] = x[n][perm[j]][s].
NPCONV_KERNEL_LB(bic_gather, 256)(const real_t* __restrict__ x, const int* __restrict__ perm,
                                  real_t* __restrict__ xg, int m, int C, int HW) {
  const int row = m * HW;
  const int total = C * row;
  NPCONV_FOR_EACH(i, total) {
    const int j = i / row;
    const int rem = i - j * row;
    const int n = rem / HW;
    xg[i] = __ldg(x + ((size_t)n * C + __ldg(perm + j)) * HW + (rem - n * HW));
  }
}

// SVD form, the K1 -> K2 X x Y conv of every block (g, h), groups of its own: z1 (G*NH*K1, m*H*W) holds the
// reduction's output, row (g*NH + h)*K1 + k1; spatial (G, NH, K2, K1, X, Y); z (NH*G*K2, m*P) as in the header.
// FT (NPCONV_BIC_FT) filters a block.
// Launch: 1-D blocks (at most 256 threads), grid (pixel blocks, ceil(K2 / FT), G*NH*KS); the pixel loop
// is grid-stride with a trip count that is the same for every thread of a block (the loop holds barriers).
// KS >= 1 splits the K1 channels among blocks: split s sums channels [s*ceil(K1/KS), (s+1)*ceil(K1/KS)) into its own
// rows of z, (NH, G, KS, K2, m*P) (KS = 1: the layout above); the expansion then sums the splits (its matrix repeated
// along them). Dynamic shared memory: CC * X * Y * FT real_t, the weights of the block's filters for CC of the
// K1 input channels (CC >= 1), laid out wsh[k * FT + f].
// one tap of bic_svd_spatial for FT filters: acc[f] += src[ih][iw] * wk[f] (zero outside the image)
template <int FT>
__device__ __forceinline__ void npc_svd_tap(real_t (&acc)[FT], const real_t* __restrict__ src, const real_t* wk,
                                            bool row_ok, int ih, int iw, int W) {
  real_t v = real_t(0);
  if (row_ok && npc_inside(iw, W)) v = __ldg(src + (size_t)ih * W + iw);
#pragma unroll
  for (int f = 0; f < FT; ++f) acc[f] += v * wk[f];
}

template <int FT>
__device__ __forceinline__ void npc_svd_spatial(const real_t* __restrict__ z1, const real_t* __restrict__ spatial,
                                                real_t* __restrict__ z, int m, int G, int NH, int K1, int K2, int H,
                                                int W, int X, int Y, int SH, int SW, int PT, int PL, int OH, int OW,
                                                int CC, int KS) {
  extern __shared__ __align__(16) unsigned char npconv_bic_svd_smem[];
  real_t* wsh = reinterpret_cast<real_t*>(npconv_bic_svd_smem);
  const int XY = X * Y;
  const int blk = blockIdx.z / KS;  // g * NH + h
  const int s = blockIdx.z - blk * KS;  // the split of the K1 channels
  const int cs = (K1 + KS - 1) / KS;
  const int c_begin = s * cs;
  const int c_end = min(K1, c_begin + cs);
  const int g = blk / NH;
  const int h = blk - g * NH;
  const int f0 = blockIdx.y * FT;
  const int P = OH * OW;
  const int total = m * P;
  const size_t HW = (size_t)H * W;
  const size_t ldi = (size_t)m * HW;
  const size_t ldo = (size_t)total;
  const real_t* zin = z1 + (size_t)blk * K1 * ldi;
  const real_t* wb = spatial + (size_t)blk * K2 * K1 * XY;
  real_t* zout = z + (((size_t)h * G + g) * KS + s) * K2 * ldo;
  for (int base = blockIdx.x * blockDim.x; base < total; base += blockDim.x * gridDim.x) {
    const int i = base + threadIdx.x;  // n * P + pixel
    const bool active = i < total;
    const int n = active ? i / P : 0;
    const int pix = active ? i - n * P : 0;
    const int oh = pix / OW;
    const int ih0 = oh * SH - PT;
    const int iw0 = (pix - oh * OW) * SW - PL;
    real_t acc[FT];
#pragma unroll
    for (int f = 0; f < FT; ++f) acc[f] = real_t(0);
    for (int c0 = c_begin; c0 < c_end; c0 += CC) {
      const int cc = min(CC, c_end - c0);
      __syncthreads();  // the previous chunk's weights are no longer read
      for (int j = threadIdx.x; j < cc * XY * FT; j += blockDim.x) {
        const int f = j % FT;
        const int k = j / FT;  // (c - c0) * XY + x * Y + y
        wsh[j] = (f0 + f < K2) ? __ldg(wb + ((size_t)(f0 + f) * K1 + c0) * XY + k) : real_t(0);
      }
      __syncthreads();
      if (active) {
        const real_t* wk = wsh;
        for (int c = 0; c < cc; ++c) {
          const real_t* src = zin + (size_t)(c0 + c) * ldi + (size_t)n * HW;
          for (int kh = 0; kh < X; ++kh) {
            const int ih = ih0 + kh;
            const bool row_ok = npc_inside(ih, H);
            for (int kw = 0; kw < Y; ++kw, wk += FT) npc_svd_tap<FT>(acc, src, wk, row_ok, ih, iw0 + kw, W);
          }
        }
      }
    }
    if (active) {
#pragma unroll
      for (int f = 0; f < FT; ++f)
        if (f0 + f < K2) zout[(size_t)(f0 + f) * ldo + i] = acc[f];
    }
  }
}

#define NPC_SVD_PARAMS                                                                                          \
  const real_t* __restrict__ z1, const real_t* __restrict__ spatial, real_t* __restrict__ z, int m, int G, int NH, \
      int K1, int K2, int H, int W, int X, int Y, int SH, int SW, int PT, int PL, int OH, int OW, int CC
// NPCONV_BIC_FT filters a block: 16 accumulators a thread (the weights of a tap serve 16 filters); KS = 1, a constant
NPCONV_KERNEL_LB(bic_svd_spatial, 256)(NPC_SVD_PARAMS) {
  npc_svd_spatial<NPCONV_BIC_FT>(z1, spatial, z, m, G, NH, K1, K2, H, W, X, Y, SH, SW, PT, PL, OH, OW, CC, 1);
}
// the same with the K1 channels in KS splits along grid z (small grids: ops_bicluster.SVD_SPLIT_MAX_BLOCKS); an
// entry point of its own, as a run-time KS took the 1-split kernel from 58 to 127 registers (sm_90, float32)
NPCONV_KERNEL_LB(bic_svd_spatial_split, 256)(NPC_SVD_PARAMS, int KS) {
  npc_svd_spatial<NPCONV_BIC_FT>(z1, spatial, z, m, G, NH, K1, K2, H, W, X, Y, SH, SW, PT, PL, OH, OW, CC, KS);
}
#undef NPC_SVD_PARAMS

// Shared separable form, the filtering: input channel jj (permuted order) of group g = chan_group[jj] is filtered
// by each shared filter its group uses, s = used_filter[used_ptr[g] + u] for u < U_g = used_ptr[g+1] - used_ptr[g]
// (vertical (S, X) with the row stride, then horizontal (S, Y) with the column stride), into
//   q[(qoff[g] + (jj - in_off[g]) * U_g + u)][n*P + p]      (q has qoff[G] rows of m*P).
// Launch: block (TW, TH) with TW*TH <= 256; grid (tiles_h * tiles_w, C, min(m, 65535)). Dynamic shared memory,
// in real_t: TIH * TIW (the input tile, TIH = (TH-1)*SH + X, TIW = (TW-1)*SW + Y) + TH * TIW (vertical pass).
NPCONV_KERNEL_LB(bic_shared_filter, 256)(const real_t* __restrict__ x, const int* __restrict__ in_perm,
                                         const int* __restrict__ chan_group, const int* __restrict__ in_off,
                                         const int* __restrict__ used_ptr, const int* __restrict__ used_filter,
                                         const int* __restrict__ qoff, const real_t* __restrict__ vertical,
                                         const real_t* __restrict__ horizontal, real_t* __restrict__ q, int m,
                                         int C, int H, int W, int X, int Y, int SH, int SW, int PT, int PL,
                                         int OH, int OW, int tiles_w) {
  extern __shared__ __align__(16) unsigned char npconv_bic_shared_smem[];
  const int TW = blockDim.x;
  const int TH = blockDim.y;
  const int TIH = (TH - 1) * SH + X;
  const int TIW = (TW - 1) * SW + Y;
  const int TIT = TIH * TIW;
  const int TVT = TH * TIW;
  real_t* xs = reinterpret_cast<real_t*>(npconv_bic_shared_smem);
  real_t* vs = xs + TIT;

  const int jj = blockIdx.y;
  const int g = chan_group[jj];
  const int u0 = used_ptr[g];
  const int U = used_ptr[g + 1] - u0;
  const int row0 = qoff[g] + (jj - in_off[g]) * U;
  const int c = in_perm[jj];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * TW + tx;
  const int nthreads = TW * TH;
  const int tile_r = blockIdx.x / tiles_w;
  const int tile_c = blockIdx.x - tile_r * tiles_w;
  const int oh = tile_r * TH + ty;
  const int ow = tile_c * TW + tx;
  const int ih0 = tile_r * TH * SH - PT;
  const int iw0 = tile_c * TW * SW - PL;
  const bool active = oh < OH && ow < OW;
  const size_t HW = (size_t)H * W;
  const size_t P = (size_t)OH * OW;
  const size_t ldq = (size_t)m * P;

  for (int n = blockIdx.z; n < m; n += gridDim.z) {
    // the input tile (zero padding); its previous readers finished before the barrier ahead of the last step 3
    const real_t* xc = x + ((size_t)n * C + c) * HW;
    for (int j = tid; j < TIT; j += nthreads) {
      const int r = j / TIW;
      const int ih = ih0 + r;
      const int iw = iw0 + (j - r * TIW);
      xs[j] = (npc_inside(ih, H) && npc_inside(iw, W)) ? __ldg(xc + (size_t)ih * W + iw) : real_t(0);
    }
    for (int u = 0; u < U; ++u) {
      const int s = __ldg(used_filter + u0 + u);
      const real_t* wv = vertical + (size_t)s * X;
      const real_t* wh = horizontal + (size_t)s * Y;
      __syncthreads();  // xs written; the previous filter's vs is no longer read
      for (int j = tid; j < TVT; j += nthreads) {
        const int r = j / TIW;
        const real_t* src = xs + r * SH * TIW + (j - r * TIW);
        real_t v = real_t(0);
#pragma unroll 1  // unrolled, ptxas spills this loop in the f64 sm_80 build
        for (int t = 0; t < X; ++t) v += __ldg(wv + t) * src[t * TIW];
        vs[j] = v;
      }
      __syncthreads();
      if (active) {
        const real_t* src = vs + ty * TIW + tx * SW;
        real_t v = real_t(0);
        for (int t = 0; t < Y; ++t) v += __ldg(wh + t) * src[t];
        q[(size_t)(row0 + u) * ldq + (size_t)n * P + (size_t)oh * OW + ow] = v;
      }
    }
  }
}

// Shared separable form, the combination: z[(h*G + g)*K + k][col] = sum_{j in group g} reduce[j, h, k] *
// q[qoff[g] + (j - in_off[g]) * U_g + slot[g, h, k]][col], with reduce (C, NH, K) in permuted order, slot (G, NH, K)
// the position of each component's shared filter in its group's list, and col = n*P + p < m*P. One thread per
// element of z (NH*G*K rows of m*P).
NPCONV_KERNEL_LB(bic_shared_combine, 256)(const real_t* __restrict__ q, const real_t* __restrict__ reduce,
                                          const int* __restrict__ slot, const int* __restrict__ in_off,
                                          const int* __restrict__ used_ptr, const int* __restrict__ qoff,
                                          real_t* __restrict__ z, int m, int P, int G, int NH, int K) {
  const int ldz = m * P;
  const int total = NH * G * K * ldz;
  const int HK = NH * K;
  NPCONV_FOR_EACH(i, total) {
    const int row = i / ldz;
    const int col = i - row * ldz;
    const int h = row / (G * K);
    const int rem = row - h * G * K;
    const int g = rem / K;
    const int hk = h * K + (rem - g * K);
    const int i0 = in_off[g];
    const int i1 = in_off[g + 1];
    const size_t step = (size_t)(used_ptr[g + 1] - used_ptr[g]) * ldz;
    const real_t* qp = q + (size_t)(qoff[g] + slot[g * HK + hk]) * ldz + col;
    real_t acc = real_t(0);
    for (int j = i0; j < i1; ++j, qp += step) acc += __ldg(reduce + (size_t)j * HK + hk) * __ldg(qp);
    z[i] = acc;
  }
}

// r (F_h, m*P), the expansion GEMM of one output group, into y (m, F, P) at channel out_perm[o0 + f], adding
// bias[out_perm[o0 + f]] when has_bias != 0.
NPCONV_KERNEL_LB(bic_scatter, 256)(const real_t* __restrict__ r, const int* __restrict__ out_perm,
                                   const real_t* __restrict__ bias, real_t* __restrict__ y, int Fh, int m, int P,
                                   int F, int o0, int has_bias) {
  const int row = m * P;
  const int total = Fh * row;
  NPCONV_FOR_EACH(i, total) {
    const int f = i / row;
    const int rem = i - f * row;
    const int n = rem / P;
    const int fo = __ldg(out_perm + o0 + f);
    real_t v = r[i];
    if (has_bias) v += __ldg(bias + fo);
    y[((size_t)n * F + fo) * P + (rem - n * P)] = v;
  }
}

// ---- a small tiled matrix product (bic_expand) ----------------------------------------------------------------
// A block of NPC_TG_THREADS threads accumulates one NPC_TG_BM x NPC_TG_BN tile of C = A (M x K) B (K x N) over
// k_begin <= k < k_end. The caller's loaders hand out the operands: la(k) is A[row, k] for the one row of the tile
// this thread loads (row = tile row threadIdx.x % 32), lb(k) is B[k, col] for its one column (col = tile column
// threadIdx.x % 32); each returns 0 outside the matrix. Each thread loads 8 elements of each operand per step of
// NPC_TG_BK (k = k0 + threadIdx.x / 32 + 2 i), the next step's while it multiplies the current one (registers), and
// sets acc[u][v] = C[tile row 4 ty + u, tile column 4 tx + v], ty = threadIdx.x / 8, tx = threadIdx.x % 8.
// Every thread of the block must call it with the same k range (it has barriers).
// Measured on an H100 (docs/gpu_results.md, eleventh session): as the core of an implicit-GEMM dense conv it ran at
// 3-9 TFLOP/s, far below cuBLAS, so it serves only small products: the expansion of bic_expand, where one launch in
// place of two GEMMs and two scatters is what counts, and the SVD form's reduction of bic_reduce likewise.
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
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = real_t(0);
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

// The expansion of all output groups at once, for few columns: for h < NH and o0 = out_off[h] <= o < out_off[h+1],
//   y[n][out_perm[o]][p] = bias[out_perm[o]] + sum_q expand[o][q] * z[h][q][n*P + p]      (q < GK = G*K rows)
// expand (F, GK) rows in permuted order, z (NH, GK, m*P). Launch: block (64), grid (ceil(m*P / 32),
// ceil(max F_h / 32), NH); a block whose 32 rows start past its group's end returns at once.
struct npc_bx_rows {      // A: row o of expand
  const real_t* row;
  bool ok;
  __device__ __forceinline__ real_t operator()(int q) const { return ok ? __ldg(row + q) : real_t(0); }
};

struct npc_bx_cols {      // B: column j of z[h]
  const real_t* col;
  int L;
  bool ok;
  __device__ __forceinline__ real_t operator()(int q) const { return ok ? __ldg(col + (size_t)q * L) : real_t(0); }
};

// Where a block of the fused expansion works: output group h = blockIdx.z, its rows f0 .. f0+31 (the group ends at
// o1; idle when f0 >= o1: the group has fewer rows), columns j0 .. j0+31 of L; col, this thread's column.
struct npc_expand_at {
  int h, f0, o1, L, j0, col;
  __device__ __forceinline__ npc_expand_at(const int* __restrict__ out_off, int L_)
      : h(blockIdx.z), f0(__ldg(out_off + blockIdx.z) + blockIdx.y * NPC_TG_BM), o1(__ldg(out_off + blockIdx.z + 1)),
        L(L_), j0(blockIdx.x * NPC_TG_BN), col(blockIdx.x * NPC_TG_BN + (threadIdx.x & 31)) {}
  __device__ __forceinline__ bool idle() const { return f0 >= o1; }
};

// The block's tile of the expansion (``at``), its scatter through out_perm and the bias; lb: this thread's column
// (at.col) of the group's B operand.
template <class LoadB>
__device__ __forceinline__ void npc_expand_tile(const LoadB& lb, const npc_expand_at& at,
                                                const real_t* __restrict__ expand, const int* __restrict__ out_perm,
                                                const real_t* __restrict__ bias, real_t* __restrict__ y, int P,
                                                int F, int GK, int has_bias) {
  const int r = threadIdx.x & 31;
  const int f0 = at.f0, o1 = at.o1, j0 = at.j0, L = at.L;
  npc_bx_rows la;
  la.ok = f0 + r < o1;
  la.row = expand + (size_t)(la.ok ? f0 + r : 0) * GK;
  real_t acc[4][4];
  npc_tile_gemm(la, lb, 0, GK, acc);

  const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int o = f0 + 4 * ty + u;
    const int fo = o < o1 ? __ldg(out_perm + o) : 0;
    const real_t b = (has_bias && o < o1) ? __ldg(bias + fo) : real_t(0);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int j = j0 + 4 * tx + v;
      const int n = j / P;
      if (o < o1 && j < L) y[((size_t)n * F + fo) * P + (j - n * P)] = acc[u][v] + b;
    }
  }
}

NPCONV_KERNEL_LB(bic_expand, NPC_TG_THREADS)(const real_t* __restrict__ z, const real_t* __restrict__ expand,
                                             const int* __restrict__ out_off, const int* __restrict__ out_perm,
                                             const real_t* __restrict__ bias, real_t* __restrict__ y, int m,
                                             int P, int F, int GK, int has_bias) {
  const npc_expand_at at(out_off, m * P);
  if (at.idle()) return;
  npc_bx_cols lb;
  lb.ok = at.col < at.L;
  lb.L = at.L;
  lb.col = z + (size_t)at.h * GK * at.L + (lb.ok ? at.col : 0);
  npc_expand_tile(lb, at, expand, out_perm, bias, y, P, F, GK, has_bias);
}

// Shared separable form, for few columns (batch 1): bic_shared_combine and bic_expand in one launch. The B operand
// of output group h, z[h][g*K + k][col] (bic_shared_combine's definition), is formed as the tiles load it, from q:
//   sum_{j in group g} reduce[j, h, k] * q[qoff[g] + (j - in_off[g]) * U_g + slot[g, h, k]][col]
// (each element once per 32-row tile of the group's outputs: C_g multiply-adds). Arguments as bic_shared_combine and
// bic_expand; GK = G*K. Launch as bic_expand.
struct npc_bxs_cols {     // B: column j of output group h's components, combined from q
  const real_t* qcol;     // q + j
  const real_t* reduce;   // reduce + h*K: reduce[jj*HK + k]
  const int* slot;        // slot + h*K: slot[g*HK + k]
  const int* in_off;
  const int* used_ptr;
  const int* qoff;
  int K, HK, L;
  bool ok;
  __device__ __forceinline__ real_t operator()(int q) const {
    if (!ok) return real_t(0);
    const int g = q / K;
    const int k = q - g * K;
    const int i0 = __ldg(in_off + g), i1 = __ldg(in_off + g + 1);
    const size_t step = (size_t)(__ldg(used_ptr + g + 1) - __ldg(used_ptr + g)) * L;
    const real_t* qp = qcol + (size_t)(__ldg(qoff + g) + __ldg(slot + g * HK + k)) * L;
    real_t acc = real_t(0);
#pragma unroll 1
    for (int jj = i0; jj < i1; ++jj, qp += step) acc += __ldg(reduce + (size_t)jj * HK + k) * __ldg(qp);
    return acc;
  }
};

NPCONV_KERNEL_LB(bic_expand_shared, NPC_TG_THREADS)(
    const real_t* __restrict__ q, const real_t* __restrict__ reduce, const int* __restrict__ slot,
    const int* __restrict__ in_off, const int* __restrict__ used_ptr, const int* __restrict__ qoff,
    const real_t* __restrict__ expand, const int* __restrict__ out_off, const int* __restrict__ out_perm,
    const real_t* __restrict__ bias, real_t* __restrict__ y, int m, int P, int F, int G, int NH, int K,
    int has_bias) {
  const npc_expand_at at(out_off, m * P);
  if (at.idle()) return;
  npc_bxs_cols lb;
  lb.ok = at.col < at.L;
  lb.qcol = q + (lb.ok ? at.col : 0);
  lb.reduce = reduce + at.h * K;
  lb.slot = slot + at.h * K;
  lb.in_off = in_off;
  lb.used_ptr = used_ptr;
  lb.qoff = qoff;
  lb.K = K;
  lb.HK = NH * K;
  lb.L = at.L;
  npc_expand_tile(lb, at, expand, out_perm, bias, y, P, F, G * K, has_bias);
}

// SVD form, for few columns (batch 1): the gather through in_perm and every group's reduction in one launch,
// instead of bic_gather and a cuBLAS GEMM a group (tiles of npc_tile_gemm, above):
//   z1[g*HK1 + r][n*HW + s] = sum_{j < C_g} reduce[in_off[g] + j][r] * x[n][in_perm[in_off[g] + j]][s]
// reduce (C, HK1) rows in permuted order (HK1 = NH*K1), x (m, C, HW), z1 (G*HK1, m*HW) as bic_svd_spatial reads it.
// Launch: block (64), grid (ceil(m*HW / 32), ceil(HK1 / 32), G).
struct npc_br_rows {      // A: row r of group g's reduction matrix, reduce^T; k runs over the group's channels
  const real_t* col;      // reduce + in_off[g]*HK1 + r
  int HK1;
  bool ok;
  __device__ __forceinline__ real_t operator()(int j) const {
    return ok ? __ldg(col + (size_t)j * HK1) : real_t(0);
  }
};

struct npc_br_cols {      // B: column (n, s) of group g's channels, read through in_perm
  const real_t* px;       // x + n*C*HW + s
  const int* perm;        // in_perm + in_off[g]
  int HW;
  bool ok;
  __device__ __forceinline__ real_t operator()(int j) const {
    return ok ? __ldg(px + (size_t)__ldg(perm + j) * HW) : real_t(0);
  }
};

NPCONV_KERNEL_LB(bic_reduce, NPC_TG_THREADS)(const real_t* __restrict__ x, const int* __restrict__ in_perm,
                                             const int* __restrict__ in_off, const real_t* __restrict__ reduce,
                                             real_t* __restrict__ z1, int m, int C, int HW, int HK1) {
  const int g = blockIdx.z;
  const int c0 = __ldg(in_off + g);
  const int cg = __ldg(in_off + g + 1) - c0;
  const int L = m * HW;
  const int r0 = blockIdx.y * NPC_TG_BM;
  const int j0 = blockIdx.x * NPC_TG_BN;
  const int t = threadIdx.x & 31;
  npc_br_rows la;
  la.ok = r0 + t < HK1;
  la.HK1 = HK1;
  la.col = reduce + (size_t)c0 * HK1 + (la.ok ? r0 + t : 0);
  npc_br_cols lb;
  const int jt = j0 + t;
  lb.ok = jt < L;
  const int n = lb.ok ? jt / HW : 0;
  lb.px = x + (size_t)n * C * HW + (lb.ok ? jt - n * HW : 0);
  lb.perm = in_perm + c0;
  lb.HW = HW;
  real_t acc[4][4];
  npc_tile_gemm(la, lb, 0, cg, acc);

  const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int r = r0 + 4 * ty + u;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int j = j0 + 4 * tx + v;
      if (r < HK1 && j < L) z1[((size_t)g * HK1 + r) * L + j] = acc[u][v];
    }
  }
}
