"""GPU entry points for CuPy arrays, one per functional op.

``npconv.functional`` validates and normalises the arguments (stride/dilation pairs, padding as
``(top, bottom, left, right)``, pooling output size) and then calls these functions; they only make the arrays
contiguous, pick a kernel and launch it. The output dtype is the input dtype (float32 or float64).

Every launch goes through :func:`_launch`, which packs the arguments from :data:`LAUNCH_SIGNATURES` (the one
table of kernel parameter kinds: device pointer, ``np.int32``, or a scalar of the array dtype). The tests compare
that table, and the arguments actually passed, with the parameter sizes in the compiled PTX.

Convolution strategy:
  * depthwise (``groups == C > 1``, one input channel per group): a direct kernel (``depthwise.cu``);
  * 1x1, stride 1, no padding, ``groups == 1``: a batched GEMM on the input as it is (no packing);
  * few input channels (``C <= DIRECT_CONV_MAX_C``, ``groups == 1``: the first layer): a direct kernel with
    the weights of 16 filters in shared memory (``conv_direct.cu``);
  * 3x3, stride 1, no dilation, ``groups == 1``, enough channels and output tiles (:func:`use_winograd`):
    Winograd F(2x2, 3x3) (``winograd.cu``: filter, input and output transforms around one batched GEMM);
  * otherwise im2col: the column matrix of a chunk of images (``im2col.cu``), one cuBLAS GEMM per group
    (``cupy.matmul``), and a kernel that writes the result to NCHW adding the bias. The chunk is as many images
    as fit in :data:`WORKSPACE_BYTES`, so the workspace is bounded whatever the batch size.
"""
from __future__ import annotations

import numpy as np

from ... import _backend
from . import loader, replay
from ._gemm import matmul as _matmul

__all__ = [
    "conv2d", "linear", "max_pool2d", "avg_pool2d", "local_response_norm", "relu", "bias_relu", "softmax",
    "normalize", "use_winograd", "LAUNCH_SIGNATURES", "WORKSPACE_BYTES", "DIRECT_CONV_MAX_C",
    "WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_TILES", "im2col_grid",
]

#: upper bound of the im2col workspace (column matrix + GEMM result of one chunk), in bytes
WORKSPACE_BYTES = 256 * 2**20
#: convolutions with at most this many input channels (groups == 1) use the direct kernel
DIRECT_CONV_MAX_C = 4
#: 3x3, stride-1, undilated, ungrouped convolutions with at least this many input and output channels and at least
#: WINOGRAD_MIN_TILES output tiles (2x2 blocks, over the whole batch) use Winograd F(2x2, 3x3) (``winograd.cu``).
#: Measured on an H200 (docs/gpu_results.md), ZF conv3-conv5 (13x13, 49 tiles per image): Winograd was level with im2col
#: at batch 8 (392 tiles), 1.4-1.6x faster at batch 32 (1568 tiles) and 2.0-2.5x at batch 128, slower at batch 1.
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_TILES = 1024
#: filters per block of the direct kernel (NPCONV_DIRECT_FT in conv_direct.cu)
DIRECT_FILTERS_PER_BLOCK = 16
#: threads per block of the softmax kernel (NPCONV_SOFTMAX_THREADS in softmax.cu)
SOFTMAX_THREADS = 128
#: shared memory a block may use without opting in to more (every CUDA GPU since sm_20)
SHARED_MEM_LIMIT = 48 * 1024

_BLOCK = 256
_MAX_GRID = 1 << 18                 # blocks of a grid-stride launch, so grid * block <= 2^26
_INDEX_LIMIT = 2**31 - 2**26        # elements an int-indexed grid-stride loop may cover without overflow
_MAX_GRID_Y = 65535                 # the hardware limit of gridDim.y

PTR, IPTR, I32, REAL = "ptr", "iptr", "i32", "real"  # IPTR: an int32 array

#: kernel name -> (source file, parameter kinds). PTR: a C-contiguous device array of the dtype;
#: I32: ``np.int32``; REAL: a scalar of the dtype (``np.float32`` / ``np.float64``).
LAUNCH_SIGNATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    # x, col, NB, C, H, W, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW
    "im2col": ("im2col", (PTR, PTR) + (I32,) * 14),
    # r, bias, y, FG, NB, P, F, F0, has_bias
    "conv_scatter": ("im2col", (PTR, PTR, PTR) + (I32,) * 6),
    # w, u, F, C
    "wino_filter": ("winograd", (PTR, PTR, I32, I32)),
    # x, v, NB, C, H, W, PT, PL, TH, TW
    "wino_input": ("winograd", (PTR, PTR) + (I32,) * 8),
    # m, bias, y, NB, F, OH, OW, TH, TW, has_bias
    "wino_output": ("winograd", (PTR, PTR, PTR) + (I32,) * 7),
    # x, w, bias, y, N, C, H, W, F, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, has_bias
    "conv_direct": ("conv_direct", (PTR,) * 4 + (I32,) * 16),
    # x, w, bias, y, N, C, H, W, M, KH, KW, SH, SW, PT, PL, DH, DW, OH, OW, has_bias
    "depthwise_conv": ("depthwise", (PTR,) * 4 + (I32,) * 16),
    # x, y, NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW
    "max_pool": ("pool", (PTR, PTR) + (I32,) * 11),
    # x, y, NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW, count_include_pad
    "avg_pool": ("pool", (PTR, PTR) + (I32,) * 12),
    # x, y, N, C, S, size, alpha, beta, k
    "lrn": ("lrn", (PTR, PTR, I32, I32, I32, I32, REAL, REAL, REAL)),
    # y, b, N, C, S
    "bias_add": ("elementwise", (PTR, PTR, I32, I32, I32)),
    "bias_relu": ("elementwise", (PTR, PTR, I32, I32, I32)),
    # x, y, n
    "relu": ("elementwise", (PTR, PTR, I32)),
    # x, mean, scale, y, N, C, S
    "normalize": ("elementwise", (PTR, PTR, PTR, PTR, I32, I32, I32)),
    # x, y, R, L
    "softmax_rows": ("softmax", (PTR, PTR, I32, I32)),
}


def _cupy():
    return _backend.require_cupy()


def pack_args(name, kinds, dtype, args):
    """Pack ``args`` for a kernel whose parameters are ``kinds`` (PTR: a C-contiguous array of ``dtype``,
    IPTR: of int32, I32: an int that fits 32 bits, REAL: a scalar of ``dtype``), checking each one."""
    if len(args) != len(kinds):
        raise TypeError(f"kernel {name} takes {len(kinds)} arguments, got {len(args)}")
    packed = list(args)
    known = _I32_MADE
    for i, kind in enumerate(kinds):   # one pass, cheap branches first: this runs before every launch
        a = args[i]
        if kind is I32:
            cached = type(a) in _I32_KEYS     # a Python int or bool (a NumPy int or a 0-d array: made each time)
            v = known.get(a) if cached else None
            if v is None:
                if not -2147483648 <= a <= 2147483647:
                    raise ValueError(f"kernel {name}, argument {i}: {a} does not fit a 32-bit int")
                v = _I32_TYPE(a)
                if cached:
                    if len(known) >= _I32_MADE_SIZE:
                        known.clear()
                    known[a] = v
            packed[i] = v
        elif kind is REAL:
            packed[i] = dtype.type(a)
        else:
            want = _INT32 if kind is IPTR else dtype
            if a.dtype != want or not a.flags.c_contiguous:
                raise TypeError(f"kernel {name}, argument {i}: expected a C-contiguous {want} array, "
                                f"got dtype {a.dtype} (c_contiguous={a.flags.c_contiguous})")
    return tuple(packed)


_I32_TYPE = np.int32
_INT32 = np.dtype(np.int32)
#: the np.int32 of each int argument seen (shapes, strides, flags): on the GPU machine's host making one took 0.6 us,
#: 12 us of a 20-argument launch (twenty-fifth session, ``bench/gpu_profile.py host``'s launch costs)
_I32_MADE: dict = {}
_I32_MADE_SIZE = 4096
_I32_KEYS = frozenset((int, bool))


def launch(table, name, dtype, grid, block, args, shared_mem=0):
    """Launch kernel ``name`` of a launch table (``{name: (source, kinds)}``: :data:`LAUNCH_SIGNATURES`, or the
    private sources' tables in ``ops_lowrank``/``ops_bicluster``), its ``args`` packed and checked as declared."""
    if name not in table:
        raise ValueError(f"no kernel {name!r} in this launch table; known: {sorted(table)}")
    source, kinds = table[name]
    dtype = np.dtype(dtype)
    kernel = loader.get_kernel(source, name, dtype)
    grid, block, packed = tuple(grid), tuple(block), pack_args(name, kinds, dtype, args)
    kernel(grid, block, packed, shared_mem=shared_mem)
    replay.recording_launch(kernel, grid, block, packed, shared_mem)


def _launch(name, dtype, grid, block, args, shared_mem=0):
    """Pack ``args`` as :data:`LAUNCH_SIGNATURES` declares for kernel ``name`` and launch it."""
    launch(LAUNCH_SIGNATURES, name, dtype, grid, block, args, shared_mem)


def _check_index_range(total, what):
    if total > _INDEX_LIMIT:
        raise ValueError(f"{what} has {total} elements; the CUDA kernels index with 32-bit ints and take at most "
                         f"{_INDEX_LIMIT}: split the batch")


def _launch_1d(name, dtype, total, args, what="the array"):
    """Launch a grid-stride kernel over ``total`` elements (nothing to do when ``total`` is 0)."""
    if total == 0:
        return
    _check_index_range(total, what)
    blocks = min(-(-total // _BLOCK), _MAX_GRID)
    _launch(name, dtype, (blocks,), (_BLOCK,), args)


#: (key, device, array module) -> device arrays built from host data by ``on_device`` (read-only for every kernel)
_ON_DEVICE: dict = {}
_ON_DEVICE_SIZE = 256


def on_device(cp, key, build):
    """``build()`` (device copies of host index data), memoised by ``key`` (hashable, e.g. the host bytes), device
    and array module, oldest entry out past ``_ON_DEVICE_SIZE``. A forward pass then copies nothing from the host:
    none is allowed while a CUDA graph is recorded, and each copy is a pageable transfer. ``id(cp)`` in the key keeps
    one module's arrays (a CPU stand-in's, a real CuPy's) from serving the other."""
    full = (key, cp.cuda.Device().id, id(cp))
    hit = _ON_DEVICE.get(full)
    if hit is None:
        if len(_ON_DEVICE) >= _ON_DEVICE_SIZE:
            _ON_DEVICE.pop(next(iter(_ON_DEVICE)))
        hit = _ON_DEVICE[full] = build()
    return hit


def contiguous(cp, a, dtype=None):
    """``a`` as a C-contiguous device array (of ``dtype`` when given); ``a`` itself when it already is one, without a
    call into CuPy (at batch 1 a layer's time is the host's, and every input of every launch passes here). None stays
    None. The ops modules of the factored layers use it too."""
    if a is None:
        return None
    if isinstance(a, cp.ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a
    return cp.ascontiguousarray(a, dtype=dtype)


# --- convolution ------------------------------------------------------------------------------------------

def conv2d(x, w, b, *, stride, padding, dilation, groups):
    """2-D convolution of CuPy arrays: x (N, C, H, W), w (F, C/groups, KH, KW), b (F,) or None.

    ``stride`` and ``dilation`` are (vertical, horizontal) pairs, ``padding`` is (top, bottom, left, right) zero
    padding, ``groups`` divides C and F. Returns a new (N, F, OH, OW) array of x's dtype.
    """
    cp = _cupy()
    x, w, b = contiguous(cp, x), contiguous(cp, w), contiguous(cp, b)
    dt = x.dtype
    N, C, H, W = (int(v) for v in x.shape)
    F, Cg, KH, KW = (int(v) for v in w.shape)
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    groups = int(groups)
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    has_bias = b is not None
    bias = b if has_bias else w          # a dummy pointer of the right dtype when there is no bias

    if groups == 1 and KH == KW == 1 and sh == sw == 1 and not any((pt, pb, pl, pr)):
        y = _matmul(w.reshape(F, C), x.reshape(N, C, H * W)).reshape(N, F, H, W)
        y = cp.ascontiguousarray(y)
        if has_bias:
            _launch_1d("bias_add", dt, y.size, (y, b, N, F, H * W), "the convolution output")
        replay.complete(y)
        return y

    y = cp.empty((N, F, OH, OW), dtype=dt)
    if y.size == 0:
        return y
    geometry = (KH, KW, sh, sw, pt, pl, dh, dw, OH, OW)

    if groups > 1 and groups == C and Cg == 1:
        _launch_1d("depthwise_conv", dt, y.size, (x, w, bias, y, N, C, H, W, F // C, *geometry, has_bias),
                   "the convolution output")
        replay.complete(y)
        return y

    smem = C * KH * KW * DIRECT_FILTERS_PER_BLOCK * dt.itemsize
    if groups == 1 and C <= DIRECT_CONV_MAX_C and smem <= SHARED_MEM_LIMIT:
        total = N * OH * OW
        _check_index_range(total, "the convolution output")
        grid = (min(-(-total // _BLOCK), _MAX_GRID), -(-F // DIRECT_FILTERS_PER_BLOCK))
        _launch("conv_direct", dt, grid, (_BLOCK,), (x, w, bias, y, N, C, H, W, F, *geometry, has_bias),
                shared_mem=smem)
        replay.complete(y)
        return y

    if use_winograd(N, C, F, groups, (KH, KW), (sh, sw), (dh, dw), (OH, OW)):
        _conv_winograd(cp, x, w, b, y, pt, pl)
    else:
        _conv_im2col(cp, x, w, b, y, groups, geometry)
    replay.complete(y)                   # launches and _matmul products only, in both
    return y


def use_winograd(N, C, F, groups, kernel, stride, dilation, out_hw):
    """Whether ``conv2d`` takes the Winograd F(2x2, 3x3) path for these shapes (see WINOGRAD_MIN_*)."""
    if groups != 1 or tuple(kernel) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return False
    tiles = N * (-(-out_hw[0] // 2)) * (-(-out_hw[1] // 2))
    return min(C, F) >= WINOGRAD_MIN_CHANNELS and tiles >= WINOGRAD_MIN_TILES


def _conv_winograd(cp, x, w, b, y, pt, pl):
    """Winograd F(2x2, 3x3): filter transform, then per chunk of images the input transform, 16 GEMMs in one
    batched cuBLAS call and the output transform (+ bias); chunks sized by WORKSPACE_BYTES. Fills ``y``."""
    dt = x.dtype
    N, C, H, W = (int(v) for v in x.shape)
    F = int(w.shape[0])
    OH, OW = (int(v) for v in y.shape[2:])
    TH, TW = -(-OH // 2), -(-OW // 2)
    tiles = TH * TW
    u = cp.empty((16, F, C), dtype=dt)
    _launch_1d("wino_filter", dt, F * C, (w, u, F, C), "the Winograd filter transform")
    per_image = 16 * (C + F) * tiles * dt.itemsize
    nb = max(1, min(N, WORKSPACE_BYTES // per_image))
    nb = min(nb, _INDEX_LIMIT // (max(C, F) * tiles))
    if nb == 0:
        _check_index_range(max(C, F) * tiles, "the Winograd transform of one image")
    v_buf = cp.empty(16 * C * nb * tiles, dtype=dt)
    m_buf = cp.empty(16 * F * nb * tiles, dtype=dt)
    has_bias = b is not None
    bias = b if has_bias else w
    for n0 in range(0, N, nb):
        m = min(nb, N - n0)
        T = m * tiles
        v = v_buf[:16 * C * T].reshape(16, C, T)
        _launch_1d("wino_input", dt, C * T, (x[n0:n0 + m], v, m, C, H, W, pt, pl, TH, TW))
        prod = m_buf[:16 * F * T].reshape(16, F, T)
        _matmul(u, v, out=prod)
        _launch_1d("wino_output", dt, F * T, (prod, bias, y[n0:n0 + m], m, F, OH, OW, TH, TW, has_bias))


def im2col_grid(columns, C):
    """The grid of an im2col launch (blocks of ``_BLOCK`` threads): a thread per column of the chunk's matrix (x,
    grid-stride), blockIdx.y walking the C input channels (KH*KW rows each)."""
    return (min(-(-columns // _BLOCK), _MAX_GRID), min(C, _MAX_GRID_Y))


def _conv_im2col(cp, x, w, b, y, groups, geometry):
    """im2col + one GEMM per group, over chunks of images sized by WORKSPACE_BYTES; fills ``y``."""
    KH, KW, sh, sw, pt, pl, dh, dw, OH, OW = geometry
    dt = x.dtype
    N, C, H, W = x.shape
    F, Cg = w.shape[:2]
    P = OH * OW
    K, Kg, Fg = C * KH * KW, Cg * KH * KW, F // groups
    per_image = (K + Fg) * P * dt.itemsize
    nb = max(1, min(N, WORKSPACE_BYTES // per_image))
    nb = min(nb, _INDEX_LIMIT // (max(K, Fg) * P))
    if nb == 0:
        _check_index_range(max(K, Fg) * P, "the im2col matrix of one image")
    col_buf = cp.empty(K * nb * P, dtype=dt)
    w2 = w.reshape(F, Kg)
    has_bias = b is not None
    bias = b if has_bias else w
    for n0 in range(0, N, nb):
        m = min(nb, N - n0)
        col = col_buf[:K * m * P].reshape(K, m * P)
        _launch("im2col", dt, im2col_grid(m * P, C), (_BLOCK,),
                (x[n0:n0 + m], col, m, C, H, W, KH, KW, sh, sw, pt, pl, dh, dw, OH, OW))
        yc = y[n0:n0 + m]
        for g in range(groups):
            r = _matmul(w2[g * Fg:(g + 1) * Fg], col[g * Kg:(g + 1) * Kg])
            _launch_1d("conv_scatter", dt, Fg * m * P, (r, bias, yc, Fg, m, P, F, g * Fg, has_bias))


def linear(x, w, b):
    """Fully connected layer of CuPy arrays: ``x @ w.T + b`` with x (N, in), w (out, in), b (out,) or None."""
    cp = _cupy()
    x, w, b = contiguous(cp, x), contiguous(cp, w), contiguous(cp, b)
    y = cp.ascontiguousarray(_matmul(x, w.T))
    if b is not None:
        N, O = y.shape
        _launch_1d("bias_add", x.dtype, y.size, (y, b, N, O, 1), "the linear output")
    replay.complete(y)
    return y


# --- pooling ----------------------------------------------------------------------------------------------

def _pool(name, x, kernel, stride, padding, out_hw, extra=()):
    cp = _cupy()
    x = contiguous(cp, x)
    N, C, H, W = (int(v) for v in x.shape)
    kh, kw = (int(v) for v in kernel)
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    oh, ow = (int(v) for v in out_hw)
    y = cp.empty((N, C, oh, ow), dtype=x.dtype)
    _launch_1d(name, x.dtype, y.size, (x, y, N * C, H, W, kh, kw, sh, sw, ph, pw, oh, ow, *extra),
               "the pooled output")
    replay.complete(y)
    return y


def max_pool2d(x, *, kernel, stride, padding, out_hw):
    """Max pooling of a CuPy x (N, C, H, W); padding (ph, pw) counts as -inf; ``out_hw`` is the output size
    (floor or ceil mode, computed by the caller). Returns a new (N, C, OH, OW) array."""
    return _pool("max_pool", x, kernel, stride, padding, out_hw)


def avg_pool2d(x, *, kernel, stride, padding, out_hw, count_include_pad):
    """Average pooling of a CuPy x (N, C, H, W) with PyTorch's divisor rule (a window is clipped to the padded
    input; ``count_include_pad`` counts its padding cells, otherwise only the input cells are counted)."""
    return _pool("avg_pool", x, kernel, stride, padding, out_hw, (int(bool(count_include_pad)),))


# --- normalisation and activations ---------------------------------------------------------------------------

def local_response_norm(x, *, size, alpha, beta, k):
    """Cross-channel LRN of a CuPy x (N, C, ...): ``x / (k + alpha/size * sum x^2)^beta`` over the channels
    ``c - size//2 .. c + (size-1)//2``. Returns a new array."""
    cp = _cupy()
    x = contiguous(cp, x)
    N, C = int(x.shape[0]), int(x.shape[1])
    S = int(np.prod(x.shape[2:], dtype=np.int64))
    y = cp.empty(x.shape, dtype=x.dtype)
    _launch_1d("lrn", x.dtype, y.size, (x, y, N, C, S, int(size), alpha, beta, k))
    replay.complete(y)
    return y


def relu(x):
    """``max(x, 0)`` of a CuPy array of any shape (NaN stays NaN); a new contiguous array."""
    cp = _cupy()
    x = contiguous(cp, x)
    y = cp.empty(x.shape, dtype=x.dtype)
    _launch_1d("relu", x.dtype, y.size, (x, y, y.size))
    replay.complete(y)
    return y


def bias_relu(y, b):
    """In place on a CuPy y (N, C, ...): ``y = max(y + b[c], 0)`` (b (C,) or None for a plain ReLU); returns y."""
    cp = _cupy()
    work = y if y.flags.c_contiguous else cp.ascontiguousarray(y)
    if b is None:
        _launch_1d("relu", y.dtype, work.size, (work, work, work.size))
    else:
        b = contiguous(cp, b)
        N, C = int(y.shape[0]), int(y.shape[1])
        S = int(np.prod(y.shape[2:], dtype=np.int64))
        _launch_1d("bias_relu", y.dtype, work.size, (work, b, N, C, S))
    if work is not y:
        y[...] = work
    return y


def softmax(x2d):
    """Numerically stable softmax over the last axis of a 2-D CuPy array; a new (R, L) array."""
    cp = _cupy()
    x2d = contiguous(cp, x2d)
    R, L = (int(v) for v in x2d.shape)
    y = cp.empty((R, L), dtype=x2d.dtype)
    if y.size:
        _check_index_range(y.size, "the softmax input")
        _launch("softmax_rows", x2d.dtype, (min(R, _MAX_GRID),), (SOFTMAX_THREADS,), (x2d, y, R, L))
    replay.complete(y)
    return y


def normalize(x, *, mean, scale):
    """Per-channel ``(x[:, c] - mean[c]) * scale[c]`` of a CuPy x (N, C, ...); a new array."""
    cp = _cupy()
    x = contiguous(cp, x)
    dt = x.dtype
    mean, scale = contiguous(cp, mean, dt), contiguous(cp, scale, dt)
    N, C = int(x.shape[0]), int(x.shape[1])
    S = int(np.prod(x.shape[2:], dtype=np.int64))
    y = cp.empty(x.shape, dtype=dt)
    _launch_1d("normalize", dt, y.size, (x, mean, scale, y, N, C, S))
    replay.complete(y)
    return y


replay.watch(__name__)
