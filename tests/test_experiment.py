"""The experiment helpers' timing: networks measured in turn (``time_interleaved``)."""
import numpy as np

from npconv import Network
from npconv.experiment import time_interleaved
from npconv.layers import Linear, ReLU


def _net(rng):
    return Network([("fc", Linear(rng.standard_normal((4, 6)))), ("relu", ReLU())], input_shape=(6,))


def test_time_interleaved_alternates_and_takes_medians(rng, monkeypatch):
    a, b = _net(rng), _net(rng)
    calls = []
    fake = {id(a): iter([0.5, 1.0, 3.0, 2.0, 9.0, 5.0]), id(b): iter([7.0, 4.0, 1.0, 6.0, 8.0, 2.0])}

    def profile_of(net):
        def profile(x, *, repeat, warmup, print_fn):
            assert repeat == 1 and print_fn is None
            calls.append(("a" if net is a else "b", warmup))
            if warmup:
                return []
            return [dict(name=n, seconds=next(fake[id(net)])) for n in net.names]
        return profile

    monkeypatch.setattr(a, "profile", profile_of(a))
    monkeypatch.setattr(b, "profile", profile_of(b))
    (pa, ta), (pb, tb) = time_interleaved([a, b], np.zeros((2, 6)), repeat=3, warmup=1)
    assert calls == [("a", 1), ("b", 1)] + [("a", 0), ("b", 0)] * 3
    # medians per layer over the three rounds: a's fc times 0.5, 3.0, 9.0 and relu 1.0, 2.0, 5.0
    assert pa == {"fc": 3.0, "relu": 2.0} and ta == 5.0
    assert pb == {"fc": 7.0, "relu": 4.0} and tb == 11.0
