"""Layer classes: thin holders of weights and hyper-parameters over ``npconv.functional``.

Importing this package registers every layer kind with the file format (``npconv.load``).
"""
from .base import LAYER_REGISTRY, Layer, layer_class, register_layer  # noqa: F401
from .dense import Conv2d, Linear  # noqa: F401
from .simple import (AvgPool2d, Dropout, Flatten, LocalResponseNorm, MaxPool2d, Normalize, ReLU,  # noqa: F401
                     Softmax)
from .lowrank import LowRankConv2d, LowRankLinear, MonochromaticConv2d, SeparableConv2d  # noqa: F401
from .bicluster import BiclusterConv2d, SharedSeparableConv2d  # noqa: F401
