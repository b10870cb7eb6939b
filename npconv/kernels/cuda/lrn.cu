// Cross-channel local response normalisation (PyTorch / Caffe convention) on x (N, C, S), S = H*W:
//     y[n,c,s] = x[n,c,s] / (k + alpha/size * sum_{c'} x[n,c',s]^2)^beta,
//     c' from c - size/2 to c + (size-1)/2, clipped to [0, C) (channels outside count as zero).
// The window sum is recomputed per output (size is small), so there is no running-sum cancellation.

NPCONV_KERNEL_LB(lrn, 256)(const real_t* __restrict__ x, real_t* __restrict__ y, int N, int C, int S,
                           int size, real_t alpha, real_t beta, real_t k) {
  const int total = N * C * S;
  const real_t scale = alpha / real_t(size);
  NPCONV_FOR_EACH(i, total) {
    const int s = i % S;
    const int c = (i / S) % C;
    const int n = i / (S * C);
    const int lo = max(c - size / 2, 0);
    const int hi = min(c + (size - 1) / 2, C - 1);
    const real_t* xs = x + (size_t)n * C * S + s;
    real_t acc = real_t(0);
    for (int cc = lo; cc <= hi; ++cc) {
      const real_t v = __ldg(xs + (size_t)cc * S);
      acc += v * v;
    }
    y[i] = x[i] * npc_pow(k + scale * acc, -beta);
  }
}
