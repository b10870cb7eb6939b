// Row softmax of x (R, L) -> y (R, L), numerically stable: y = exp(x - max) / sum(exp(x - max)).
// One block of NPCONV_SOFTMAX_THREADS threads (a power of two; ops.py launches exactly that many) per row,
// grid-striding over rows; the max and the sum are tree reductions in shared memory. A row holding NaN or
// +inf gives NaN, as in PyTorch.

#define NPCONV_SOFTMAX_THREADS 128

NPCONV_KERNEL_LB(softmax_rows, NPCONV_SOFTMAX_THREADS)(const real_t* __restrict__ x,
                                                       real_t* __restrict__ y, int R, int L) {
  __shared__ real_t red[NPCONV_SOFTMAX_THREADS];
  const int t = threadIdx.x;
  // the row loop bound is the same for every thread of the block, so the barriers below are uniform
  for (int row = blockIdx.x; row < R; row += gridDim.x) {
    const real_t* xr = x + (size_t)row * L;
    real_t* yr = y + (size_t)row * L;

    real_t m = npc_neg_inf(real_t(0));
    for (int j = t; j < L; j += NPCONV_SOFTMAX_THREADS) {
      const real_t v = xr[j];
      m = v > m ? v : m;
    }
    red[t] = m;
    __syncthreads();
    for (int s = NPCONV_SOFTMAX_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) red[t] = red[t + s] > red[t] ? red[t + s] : red[t];
      __syncthreads();
    }
    m = red[0];
    __syncthreads();  // everyone has read red[0] before it is overwritten below

    real_t sum = real_t(0);
    for (int j = t; j < L; j += NPCONV_SOFTMAX_THREADS) {
      const real_t e = npc_exp(xr[j] - m);
      yr[j] = e;
      sum += e;
    }
    red[t] = sum;
    __syncthreads();
    for (int s = NPCONV_SOFTMAX_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) red[t] += red[t + s];
      __syncthreads();
    }
    const real_t inv = real_t(1) / red[0];
    __syncthreads();  // red[0] is read by all before the next row reuses red
    for (int j = t; j < L; j += NPCONV_SOFTMAX_THREADS) yr[j] *= inv;
  }
}
