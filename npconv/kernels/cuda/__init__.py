"""The GPU backend: CUDA C kernels (``*.cu`` package data) run through ``cupy.RawModule``, plus cuBLAS GEMMs.

``loader`` builds and memoizes one module per (source, dtype); ``ops`` holds one entry point per functional
op for CuPy arrays (called by ``npconv.functional`` with validated arguments). Importing this package does
not import CuPy. See docs/gpu.md for how the kernels are verified without a GPU.
"""
