"""Dense Conv2d and Linear layers: input validation (forward itself is covered by tests/functional)."""
import numpy as np
import pytest

from npconv.layers.dense import Conv2d, Linear


@pytest.mark.parametrize("make,x", [
    (lambda r: Conv2d(r.standard_normal((4, 3, 3, 3)), r.standard_normal(4), padding=1), np.zeros((1, 3, 5, 5))),
    (lambda r: Linear(r.standard_normal((4, 5)), r.standard_normal(4)), np.zeros((2, 5))),
])
def test_non_array_input_is_a_type_error(rng, make, x):
    layer = make(rng)
    with pytest.raises(TypeError, match=r"x must be a numpy.ndarray or cupy.ndarray, got list"):
        layer(x.tolist())
    with pytest.raises(TypeError, match=r"x must be a numpy.ndarray or cupy.ndarray, got tuple"):
        layer(tuple(x.tolist()))
    assert layer(x).shape[0] == x.shape[0]            # an array still runs
