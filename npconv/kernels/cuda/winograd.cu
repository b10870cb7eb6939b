// Winograd F(2x2, 3x3) convolution (Lavin & Gray 2016) for 3x3 kernels with stride 1 and no dilation: each 2x2
// block of outputs ("tile") of one channel comes from a 4x4 input window with 16 multiplies per (filter, channel)
// instead of 36, so the GEMM work drops by 2.25x (less the waste of a half tile when OH or OW is odd).
//
//   U[e][f][c] = (G g_fc G^T)[e]       e = 4a + b, g_fc the 3x3 filter          npconv_wino_filter
//   V[e][c][t] = (B^T d_ct B)[e]       d_ct the 4x4 window of tile t, channel c  npconv_wino_input
//   M[e]       = U[e] @ V[e]           16 GEMMs (F, C) @ (C, T): one batched cuBLAS call, in ops.py
//   y tile     = A^T M_ft A  (+ bias)  the 2x2 outputs of tile t, filter f       npconv_wino_output
//
//   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   A^T = [1 1 1 0; 0 1 -1 -1]
//
// Tiles: TH = ceil(OH/2) by TW = ceil(OW/2) per image, t = (n*TH + th)*TW + tw over the NB images of a chunk. The
// window of tile (th, tw) starts at input row 2*th - PT and column 2*tw - PL; reads outside the image are the zero
// padding (the bottom/right padding enters only through OH/OW, computed by the caller). Outputs past OH/OW (odd
// sizes) are computed and dropped. All three kernels are one thread per output group, grid-stride; the 16 values
// of one thread are written (or read) 16 planes apart, so consecutive threads touch consecutive addresses.

NPCONV_KERNEL_LB(wino_filter, 256)(const real_t* __restrict__ w, real_t* __restrict__ u, int F, int C) {
  const int total = F * C;
  NPCONV_FOR_EACH(i, total) {  // i = f*C + c; w is (F, C, 3, 3)
    const real_t* g = w + (size_t)i * 9;
    const real_t h = real_t(0.5);
    real_t t[4][3];  // G g
    for (int j = 0; j < 3; ++j) {
      const real_t g0 = g[j], g1 = g[3 + j], g2 = g[6 + j];
      t[0][j] = g0;
      t[1][j] = h * (g0 + g1 + g2);
      t[2][j] = h * (g0 - g1 + g2);
      t[3][j] = g2;
    }
    for (int a = 0; a < 4; ++a) {  // (G g) G^T, row a
      const real_t r0 = t[a][0], r1 = t[a][1], r2 = t[a][2];
      real_t* ua = u + (size_t)(4 * a) * total + i;
      ua[0] = r0;
      ua[(size_t)total] = h * (r0 + r1 + r2);
      ua[(size_t)2 * total] = h * (r0 - r1 + r2);
      ua[(size_t)3 * total] = r2;
    }
  }
}

NPCONV_KERNEL_LB(wino_input, 256)(const real_t* __restrict__ x, real_t* __restrict__ v,
                                  int NB, int C, int H, int W, int PT, int PL, int TH, int TW) {
  const int tiles = TH * TW;
  const int T = NB * tiles;
  const int total = C * T;
  NPCONV_FOR_EACH(i, total) {  // i = c*T + t
    const int c = i / T;
    const int t = i - c * T;
    const int n = t / tiles;
    const int r = t - n * tiles;
    const int th = r / TW;
    const int tw = r - th * TW;
    const int h0 = 2 * th - PT;
    const int w0 = 2 * tw - PL;
    const real_t* xc = x + ((size_t)n * C + c) * H * W;
    real_t d[4][4];
    for (int a = 0; a < 4; ++a) {
      const int ih = h0 + a;
      for (int b = 0; b < 4; ++b) {
        const int iw = w0 + b;
        d[a][b] = (npc_inside(ih, H) && npc_inside(iw, W)) ? __ldg(xc + (size_t)ih * W + iw) : real_t(0);
      }
    }
    real_t s[4][4];  // B^T d
    for (int j = 0; j < 4; ++j) {
      s[0][j] = d[0][j] - d[2][j];
      s[1][j] = d[1][j] + d[2][j];
      s[2][j] = d[2][j] - d[1][j];
      s[3][j] = d[1][j] - d[3][j];
    }
    for (int a = 0; a < 4; ++a) {  // (B^T d) B, row a
      real_t* va = v + (size_t)(4 * a) * total + i;
      va[0] = s[a][0] - s[a][2];
      va[(size_t)total] = s[a][1] + s[a][2];
      va[(size_t)2 * total] = s[a][2] - s[a][1];
      va[(size_t)3 * total] = s[a][1] - s[a][3];
    }
  }
}

// m is (16, F, T); y is the chunk's output (NB, F, OH, OW)
NPCONV_KERNEL_LB(wino_output, 256)(const real_t* __restrict__ m, const real_t* __restrict__ bias,
                                   real_t* __restrict__ y, int NB, int F, int OH, int OW, int TH, int TW,
                                   int has_bias) {
  const int tiles = TH * TW;
  const int T = NB * tiles;
  const int total = F * T;
  NPCONV_FOR_EACH(i, total) {  // i = f*T + t
    const int f = i / T;
    const int t = i - f * T;
    const int n = t / tiles;
    const int r = t - n * tiles;
    const int th = r / TW;
    const int tw = r - th * TW;
    real_t q[2][4];  // A^T M
    for (int j = 0; j < 4; ++j) {
      const real_t m0 = m[(size_t)j * total + i], m1 = m[(size_t)(4 + j) * total + i];
      const real_t m2 = m[(size_t)(8 + j) * total + i], m3 = m[(size_t)(12 + j) * total + i];
      q[0][j] = m0 + m1 + m2;
      q[1][j] = m1 - m2 - m3;
    }
    const real_t bv = has_bias ? bias[f] : real_t(0);
    const int ow = 2 * tw;
    for (int a = 0; a < 2; ++a) {  // (A^T M) A, row a
      const int oh = 2 * th + a;
      if (oh >= OH) break;
      real_t* yr = y + (((size_t)n * F + f) * OH + oh) * OW + ow;
      yr[0] = q[a][0] + q[a][1] + q[a][2] + bv;
      if (ow + 1 < OW) yr[1] = q[a][1] - q[a][2] - q[a][3] + bv;
    }
  }
}
