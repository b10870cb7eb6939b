// Depthwise convolution: groups == C, one input channel per group, F = C*M output channels (output
// channel f reads input channel f / M). Any kernel shape (5x1, 1x5, ...), stride, 4-sided padding and
// dilation. One thread per output element; weights w (F, 1, KH, KW).

NPCONV_KERNEL_LB(depthwise_conv, 256)(const real_t* __restrict__ x, const real_t* __restrict__ w,
                                      const real_t* __restrict__ bias, real_t* __restrict__ y,
                                      int N, int C, int H, int W, int M, int KH, int KW, int SH, int SW,
                                      int PT, int PL, int DH, int DW, int OH, int OW, int has_bias) {
  const int F = C * M;
  const int total = N * F * OH * OW;
  NPCONV_FOR_EACH(i, total) {
    const int ow = i % OW;
    const int oh = (i / OW) % OH;
    const int f = (i / (OW * OH)) % F;
    const int n = i / (OW * OH * F);
    const real_t* xc = x + ((size_t)n * C + f / M) * H * W;
    const real_t* wf = w + (size_t)f * KH * KW;
    real_t acc = real_t(0);
    for (int kh = 0; kh < KH; ++kh) {
      const int ih = oh * SH - PT + kh * DH;
      if (!npc_inside(ih, H)) continue;
      for (int kw = 0; kw < KW; ++kw) {
        const int iw = ow * SW - PL + kw * DW;
        if (npc_inside(iw, W)) acc += __ldg(xc + (size_t)ih * W + iw) * __ldg(wf + kh * KW + kw);
      }
    }
    if (has_bias) acc += bias[f];
    y[i] = acc;
  }
}
