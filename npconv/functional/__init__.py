"""Pure functions, one module per layer family: the source of truth for every layer.

NumPy arrays run on the CPU, CuPy arrays on the GPU (dispatch by array type, no global switch).
"""
from .bicluster import (bicluster_conv2d, bicluster_cp_conv2d, bicluster_svd_conv2d,  # noqa: F401
                        shared_separable_conv2d)
from .lowrank import lowrank_conv2d, lowrank_linear, monochromatic_conv2d, separable_conv2d  # noqa: F401
from .activation import bias_relu_, dropout, flatten, relu, softmax  # noqa: F401
from .conv import conv2d  # noqa: F401
from .linear import linear  # noqa: F401
from .normalization import local_response_norm, normalize  # noqa: F401
from .pooling import avg_pool2d, max_pool2d  # noqa: F401

__all__ = ["conv2d", "linear", "max_pool2d", "avg_pool2d", "local_response_norm", "normalize", "relu",
           "bias_relu_", "softmax", "flatten", "dropout", "lowrank_linear", "lowrank_conv2d", "monochromatic_conv2d",
           "separable_conv2d", "bicluster_conv2d", "bicluster_cp_conv2d", "bicluster_svd_conv2d",
           "shared_separable_conv2d"]
