"""First-call (compile) time of npconv's numba kernels, cold and warm.

    python bench/compile_time.py        # runs itself twice in fresh processes sharing an empty numba cache

The cold run compiles and writes the on-disk cache (``cache=True``); the warm run only loads it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = r"""
import time, numpy as np
t0 = time.perf_counter()
import npconv
from npconv.functional import conv2d
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
w = np.ones((4, 3, 3, 3), np.float32)
t2 = time.perf_counter(); conv2d(x, w, padding=1); t3 = time.perf_counter()
conv2d(x, w, padding=1); t4 = time.perf_counter()
net = npconv.models.load_reference(); xb = np.zeros((2, 3, 32, 32), np.float32)
t5 = time.perf_counter(); net.forward(xb); t6 = time.perf_counter(); net.forward(xb); t7 = time.perf_counter()
print(f"import {t1 - t0:.2f} s; first conv2d {t3 - t2:.2f} s, second {1e3 * (t4 - t3):.2f} ms; "
      f"first reference forward {t6 - t5:.2f} s, second {1e3 * (t7 - t6):.1f} ms")
"""


def main():
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold cache", "warm cache"):
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
            print(f"{label}: {out.stdout.strip()}")


if __name__ == "__main__":
    main()
