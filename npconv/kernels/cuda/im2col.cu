// im2col convolution: a packing kernel and the kernel that scatters the GEMM result back to NCHW.
//
// For a chunk of NB images, npconv_im2col writes the column matrix
//     col[k][n][p],  k = (c*KH + kh)*KW + kw  (C*KH*KW rows),  p = oh*OW + ow  (NB*OH*OW columns)
// so that the rows of one channel group are contiguous and one GEMM  w_g (Fg, Kg) @ col_g (Kg, NB*P)
// computes that group for the whole chunk. Zero padding may differ on each side: the top/left padding
// shifts the windows, the bottom/right padding only enters through OH/OW (computed by the caller).

// Launch geometry: blockIdx.y (and its grid-stride loop) walks the rows k, so each thread works out (c, kh, kw)
// once per row; the x dimension walks the row's NB*P columns with two integer divisions per element (instead of
// six for one flat index over the whole matrix).
NPCONV_KERNEL_LB(im2col, 256)(const real_t* __restrict__ x, real_t* __restrict__ col,
                              int NB, int C, int H, int W, int KH, int KW, int SH, int SW,
                              int PT, int PL, int DH, int DW, int OH, int OW) {
  const int P = OH * OW;
  const int L = NB * P;            // columns of col
  const int K = C * KH * KW;       // rows of col
  for (int k = blockIdx.y; k < K; k += gridDim.y) {
    const int kw = k % KW;
    const int kh = (k / KW) % KH;
    const int c = k / (KW * KH);
    const int h0 = kh * DH - PT;
    const int w0 = kw * DW - PL;
    const real_t* xc = x + (size_t)c * H * W;
    real_t* row = col + (size_t)k * L;
    NPCONV_FOR_EACH(j, L) {
      const int n = j / P;
      const int p = j - n * P;
      const int oh = p / OW;
      const int ow = p - oh * OW;
      const int ih = oh * SH + h0;
      const int iw = ow * SW + w0;
      real_t v = real_t(0);
      if (npc_inside(ih, H) && npc_inside(iw, W))
        v = __ldg(xc + ((size_t)n * C * H + ih) * W + iw);
      row[j] = v;
    }
  }
}

// r is the GEMM result of one channel group for one chunk: r[f][n][p] (FG, NB, P). Write it into the
// chunk's output y (NB, F, P) at channels F0 .. F0+FG-1, adding bias[F0 + f] when has_bias != 0.
NPCONV_KERNEL_LB(conv_scatter, 256)(const real_t* __restrict__ r, const real_t* __restrict__ bias,
                                    real_t* __restrict__ y, int FG, int NB, int P, int F, int F0,
                                    int has_bias) {
  const int total = FG * NB * P;
  NPCONV_FOR_EACH(i, total) {
    const int p = i % P;
    const int t = i / P;
    const int f = t % FG;
    const int n = t / FG;
    real_t v = r[((size_t)f * NB + n) * P + p];
    if (has_bias) v += bias[F0 + f];
    y[((size_t)n * F + F0 + f) * P + p] = v;
  }
}
