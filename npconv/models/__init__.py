"""The bundled reference network (CIFAR-10, trained with ``python -m npconv.models.train_reference``).

See ``npconv/models/MODEL_CARD.md`` for its architecture, data, accuracy and the command that reproduces it.
"""
from __future__ import annotations

import os

__all__ = ["reference_path", "load_reference"]


def reference_path():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.npz")


def load_reference():
    """The bundled CIFAR-10 reference Network (input: RGB NCHW floats in [0, 255], output: 10 logits)."""
    from ..io import load
    p = reference_path()
    if not os.path.exists(p):
        raise FileNotFoundError(f"the bundled reference network {p!r} is missing from this installation; "
                                "re-install npconv or run `python -m npconv.models.train_reference`")
    return load(p)
