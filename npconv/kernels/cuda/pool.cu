// 2-D max and average pooling over x (NC, H, W) -> y (NC, OH, OW); the caller computes OH/OW (floor or
// PyTorch ceil mode). Window of output (oh, ow) starts at (oh*SH - PH, ow*SW - PW).

// Max pooling: the padding counts as -inf (it never wins); a NaN in the window gives NaN.
NPCONV_KERNEL_LB(max_pool, 256)(const real_t* __restrict__ x, real_t* __restrict__ y, int NC, int H,
                                int W, int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW) {
  const int total = NC * OH * OW;
  NPCONV_FOR_EACH(i, total) {
    const int ow = i % OW;
    const int oh = (i / OW) % OH;
    const int nc = i / (OW * OH);
    const int h0 = oh * SH - PH;
    const int w0 = ow * SW - PW;
    const int hs = max(h0, 0), he = min(h0 + KH, H);
    const int ws = max(w0, 0), we = min(w0 + KW, W);
    const real_t* xc = x + (size_t)nc * H * W;
    real_t best = npc_neg_inf(real_t(0));
    for (int ih = hs; ih < he; ++ih)
      for (int iw = ws; iw < we; ++iw) best = npc_max_nan(best, __ldg(xc + (size_t)ih * W + iw));
    y[i] = best;
  }
}

// Average pooling with PyTorch's divisor: the window is first clipped to the padded input
// [-PH, H+PH) x [-PW, W+PW) (a ceil-mode window may reach past it); with count_include_pad the divisor is
// that clipped window's area, otherwise the number of real input elements in it.
NPCONV_KERNEL_LB(avg_pool, 256)(const real_t* __restrict__ x, real_t* __restrict__ y, int NC, int H,
                                int W, int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW,
                                int count_include_pad) {
  const int total = NC * OH * OW;
  NPCONV_FOR_EACH(i, total) {
    const int ow = i % OW;
    const int oh = (i / OW) % OH;
    const int nc = i / (OW * OH);
    int hs = oh * SH - PH, ws = ow * SW - PW;
    int he = min(hs + KH, H + PH), we = min(ws + KW, W + PW);
    const int padded_area = (he - hs) * (we - ws);
    hs = max(hs, 0);
    ws = max(ws, 0);
    he = min(he, H);
    we = min(we, W);
    const real_t* xc = x + (size_t)nc * H * W;
    real_t acc = real_t(0);
    for (int ih = hs; ih < he; ++ih)
      for (int iw = ws; iw < we; ++iw) acc += __ldg(xc + (size_t)ih * W + iw);
    const int divisor = count_include_pad ? padded_area : (he - hs) * (we - ws);
    y[i] = acc / real_t(divisor);
  }
}
