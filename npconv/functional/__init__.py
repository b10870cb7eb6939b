"""Pure functions, one module per layer family: the source of truth for every layer.

NumPy arrays run on the CPU, CuPy arrays on the GPU (dispatch by array type, no global switch).
"""
from .activation import bias_relu_, dropout, flatten, relu, softmax  # noqa: F401
from .conv import conv2d  # noqa: F401
from .linear import linear  # noqa: F401
from .normalization import local_response_norm, normalize  # noqa: F401
from .pooling import avg_pool2d, max_pool2d  # noqa: F401

__all__ = ["conv2d", "linear", "max_pool2d", "avg_pool2d", "local_response_norm", "normalize", "relu",
           "bias_relu_", "softmax", "flatten", "dropout"]
