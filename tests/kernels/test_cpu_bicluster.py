"""Helpers of the biclustered layers' CPU kernels (``npconv.kernels.cpu.bicluster``); the kernels themselves are
checked through the layers, in ``tests/functional/test_bicluster.py``."""
import numpy as np
import pytest

from npconv.kernels.cpu import bicluster as KB


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_next_plane_is_the_next_jobs_first_channel(dtype):
    """The plane a front-end job fetches after its group: the next group's first channel (in group order, through
    ``in_perm``), group 0 of the next image after the last group, none past the batch; none at all for an input
    that fits a core's L2 (``AHEAD_MIN_BYTES``)."""
    N, C, H, W = 3, 6, 120, 130
    x = np.zeros((N, C, H, W), dtype)
    assert x.nbytes > KB.AHEAD_MIN_BYTES
    in_perm = np.array([4, 0, 5, 2, 1, 3], np.int64)
    in_off = np.array([0, 2, 3, 6], np.int64)       # groups of 2, 1 and 3 channels
    for n in range(N):
        for g in range(1, 4):
            got = KB.next_plane(x, n, g, in_perm, in_off)
            m, gg = (n, g) if g < 3 else (n + 1, 0)
            want = -1 if m == N else (m * C + in_perm[in_off[gg]]) * H * W
            assert got == want, (n, g)
    small = np.zeros((1, C, 8, 8), dtype)
    assert all(KB.next_plane(small, 0, g, in_perm, in_off) == -1 for g in range(1, 4))
