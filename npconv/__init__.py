"""npconv: CNN inference over NumPy (numba + BLAS on the CPU) and CuPy (CUDA RawKernels on the GPU), with the
low-rank approximations of Denton et al., "Exploiting Linear Structure Within Convolutional Networks for Efficient
Evaluation" (NIPS 2014).

Importing npconv is light: no CuPy import, no kernel compilation (numba kernels compile on first use and are
cached on disk).
"""
from ._threads import configure_thread_env as _configure_threads

_configure_threads()  # before numba loads its OpenMP runtime (and NumPy its OpenBLAS, if not yet): npconv/_threads.py

from . import functional  # noqa: E402,F401
from . import layers  # noqa: E402,F401
from . import models  # noqa: E402,F401
from .network import Network  # noqa: E402,F401
from .io import load, save, from_torch, load_state_dict  # noqa: E402,F401
from .approximate import approximate  # noqa: E402,F401
from .tuning import tune  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["Network", "load", "save", "from_torch", "load_state_dict", "approximate", "tune", "functional", "layers",
           "models"]
