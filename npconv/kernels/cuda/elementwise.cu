// Elementwise kernels over contiguous arrays. "NCS" arrays are (N, C, S) with S = H*W (S = 1 for a
// fully connected layer's (N, C) output); the per-channel vector has C entries.

// y[n,c,s] += b[c], in place
NPCONV_KERNEL_LB(bias_add, 256)(real_t* __restrict__ y, const real_t* __restrict__ b, int N, int C,
                                int S) {
  const int total = N * C * S;
  NPCONV_FOR_EACH(i, total) y[i] += b[(i / S) % C];
}

// y[n,c,s] = max(y[n,c,s] + b[c], 0), in place (NaN stays NaN)
NPCONV_KERNEL_LB(bias_relu, 256)(real_t* __restrict__ y, const real_t* __restrict__ b, int N, int C,
                                 int S) {
  const int total = N * C * S;
  NPCONV_FOR_EACH(i, total) y[i] = npc_relu(y[i] + b[(i / S) % C]);
}

// y = max(x, 0) over n elements (NaN stays NaN); x and y may be the same array
NPCONV_KERNEL_LB(relu, 256)(const real_t* x, real_t* y, int n) {
  NPCONV_FOR_EACH(i, n) y[i] = npc_relu(x[i]);
}

// y[n,c,s] = (x[n,c,s] - mean[c]) * scale[c]
NPCONV_KERNEL_LB(normalize, 256)(const real_t* __restrict__ x, const real_t* __restrict__ mean,
                                 const real_t* __restrict__ scale, real_t* __restrict__ y, int N, int C,
                                 int S) {
  const int total = N * C * S;
  NPCONV_FOR_EACH(i, total) {
    const int c = (i / S) % C;
    y[i] = (x[i] - mean[c]) * scale[c];
  }
}
