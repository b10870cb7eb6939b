"""Pure functions, one module per layer family: the source of truth for every layer.

NumPy arrays run on the CPU, CuPy arrays on the GPU (dispatch by array type, no global switch).
"""
from .conv import conv2d  # noqa: F401
from .linear import linear  # noqa: F401

_OPTIONAL = {
    "pooling": ("max_pool2d", "avg_pool2d"),
    "normalization": ("local_response_norm", "normalize"),
    "activation": ("relu", "softmax", "flatten", "dropout", "bias_relu_"),
}


def __getattr__(name):
    import importlib
    for mod, names in _OPTIONAL.items():
        if name in names:
            return getattr(importlib.import_module(f".{mod}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
