// Implicit-GEMM convolution for small problems (few output positions: batch 1 to a few images), in one launch.
//
// y[n][f][p] = bias[f] + sum_k w[f][k] * x(k, n, p): the im2col product without the column matrix, with
// k = (c*KH + kh)*KW + kw and the column j = n*P + p, P = OH*OW. Each block computes a 32 x 32 tile (filters x
// columns) with npc_tile_gemm (the prelude): one launch instead of im2col + a cuBLAS GEMM + a scatter, and no
// workspace. At batch 1 the im2col path is bound by the host (four launches and their Python; ncu on an H100: ZF
// conv2 spent 45 us on the device of a 0.2 ms call), which is what this kernel is for.
//
// ktab (3*K ints, made once per geometry by the host): for row k, ktab[3k] = c*H*W + kh*DH*W + kw*DW (the offset of
// the tap from the window origin), ktab[3k+1] = kh*DH, ktab[3k+2] = kw*DW (its place in the window, for the bounds).
//
// Split over k: grid.z = S slices of kslice rows each. With S == 1 the block writes y (NCHW) and adds the bias;
// with S > 1 it writes its partial tile to part (S, F, N*P) and conv_splitk_sum adds the slices and the bias.
// Launch: block (64), grid (ceil(N*P / 32), ceil(F / 32), S).

struct npc_ig_weights {   // A: a row of w (F, K)
  const real_t* row;
  bool ok;
  __device__ __forceinline__ real_t operator()(int k) const { return ok ? __ldg(row + k) : real_t(0); }
};

struct npc_ig_patches {   // B: the column j of the implicit im2col matrix
  const real_t* x;        // image n, at the window origin's offset (origin may lie in the padding)
  const int* ktab;
  long long origin;       // offset of the window origin (ih0, iw0) in x's image n
  int ih0, iw0, H, W;
  bool ok;
  __device__ __forceinline__ real_t operator()(int k) const {
    if (!ok) return real_t(0);
    const int ih = ih0 + __ldg(ktab + 3 * k + 1), iw = iw0 + __ldg(ktab + 3 * k + 2);
    return npc_inside(ih, H) && npc_inside(iw, W) ? __ldg(x + origin + __ldg(ktab + 3 * k)) : real_t(0);
  }
};

NPCONV_KERNEL_LB(conv_igemm, NPC_TG_THREADS)(const real_t* __restrict__ x, const real_t* __restrict__ w,
                                             const int* __restrict__ ktab, const real_t* __restrict__ bias,
                                             real_t* __restrict__ out, int N, int C, int H, int W, int F, int K,
                                             int SH, int SW, int PT, int PL, int OH, int OW, int kslice,
                                             int has_bias) {
  const int P = OH * OW;
  const int NP = N * P;
  const int f0 = blockIdx.y * NPC_TG_BM, j0 = blockIdx.x * NPC_TG_BN;
  const int r = threadIdx.x & 31;

  npc_ig_weights la;
  la.ok = f0 + r < F;
  la.row = w + (size_t)(la.ok ? f0 + r : 0) * K;

  npc_ig_patches lb;
  const int j = j0 + r;
  lb.ok = j < NP;
  const int n = lb.ok ? j / P : 0;
  const int p = lb.ok ? j - n * P : 0;
  const int oh = p / OW;
  lb.ih0 = oh * SH - PT;
  lb.iw0 = (p - oh * OW) * SW - PL;
  lb.H = H;
  lb.W = W;
  lb.x = x + (size_t)n * C * H * W;
  lb.origin = (long long)lb.ih0 * W + lb.iw0;
  lb.ktab = ktab;

  const int k_begin = blockIdx.z * kslice;
  const int k_end = min(K, k_begin + kslice);
  real_t acc[4][4];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = real_t(0);
  npc_tile_gemm(la, lb, k_begin, k_end, acc);

  const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    const int jj = j0 + 4 * tx + v;
    const int nn = jj / P;
    // y[nn][f][pp] (one slice) or part[z][f][jj]: the offset of filter 0, then F*P or N*P apart per filter
    const size_t at = gridDim.z == 1 ? (size_t)nn * F * P + (jj - nn * P) : (size_t)blockIdx.z * F * NP + jj;
    const size_t fstride = gridDim.z == 1 ? (size_t)P : (size_t)NP;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int f = f0 + 4 * ty + u;
      if (f < F && jj < NP)
        out[at + f * fstride] = acc[u][v] + ((has_bias && gridDim.z == 1) ? bias[f] : real_t(0));
    }
  }
}

// y[n][f][p] = sum_s part[s][f][n*P + p] (+ bias[f]): the slices of a split conv_igemm, in order s = 0, 1, ...
NPCONV_KERNEL_LB(conv_splitk_sum, 256)(const real_t* __restrict__ part, const real_t* __restrict__ bias,
                                       real_t* __restrict__ y, int S, int N, int F, int P, int has_bias) {
  const int NP = N * P;
  const int total = F * NP;
  NPCONV_FOR_EACH(i, total) {
    const int p = i % P;
    const int t = i / P;
    const int f = t % F;
    const int n = t / F;
    const size_t src = (size_t)f * NP + (size_t)n * P + p;
    real_t v = has_bias ? bias[f] : real_t(0);
    for (int s = 0; s < S; ++s) v += part[(size_t)s * F * NP + src];
    y[i] = v;
  }
}
