"""The npconv weight-file format, atomic saving, safe loading, and the PyTorch importer.

Format (version 1): one ``.npz`` archive (a zip of ``.npy`` files, as written by ``numpy.savez``) holding
- ``__npconv__``: a uint8 array, the UTF-8 bytes of a JSON document
  ``{"format": "npconv", "version": 1, "input_shape": [...] | null, "meta": {...},
     "layers": [{"name": str, "kind": str, "config": {...},
                 "params": {param: {"key": str, "shape": [...], "dtype": "float32"|"float64"|"int64"...}}}]}``
- one array per layer parameter, under the key named in the manifest (``"<layer index>.<param>"``).
Loading uses ``numpy.load(..., allow_pickle=False)``: no code runs on load. Every array is checked against the
manifest (present; shape and dtype from its ``.npy`` header, before it is read; finite); any failure, a corrupt,
truncated or foreign file included, is a ValueError naming the path (docs/format.md).
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
from numpy.lib import format as fmt

from ._backend import FLOAT_DTYPES, to_numpy
from ._fileio import atomic_write
from ._validate import raise_with_context
from .layers import layer_class
from .network import Network

__all__ = ["save", "load", "from_torch", "load_state_dict", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MANIFEST = "__npconv__"


def save(net, path, *, compress=False):
    """Write ``net`` to ``path`` (an ``.npz`` file) atomically: a reader never sees a half-written file.

    Every array must be one that ``load`` accepts: an array of object or structured dtype is a TypeError, a
    floating-point array with NaN or inf a ValueError, each naming the layer and the key, raised before anything
    is written. Arrays in non-native byte order are stored in native order (same values).
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be an npconv Network, got {type(net).__name__}")
    arrays, layers = {}, []
    for i, (name, layer) in enumerate(net.items()):
        params = {}
        for pname, arr in layer.params.items():
            key = f"{i}.{pname}"
            a, dtype = _storable(to_numpy(arr), f"layer {name!r}: array {pname!r} (key {key!r})")
            arrays[key] = a
            params[pname] = {"key": key, "shape": list(a.shape), "dtype": dtype}
        layers.append({"name": name, "kind": layer.kind, "config": layer.config(), "params": params})
    doc = {"format": "npconv", "version": FORMAT_VERSION,
           "input_shape": None if net.input_shape is None else list(net.input_shape),
           "meta": net.meta, "layers": layers}
    try:
        text = json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"net: the configuration or meta is not JSON-serialisable: {exc}") from exc
    arrays[_MANIFEST] = np.frombuffer(text.encode("utf-8"), np.uint8)
    writer = np.savez_compressed if compress else np.savez
    # every array was checked above (no object dtype), so nothing can need pickle; numpy >= 2.1 also refuses it
    no_pickle = {"allow_pickle": False} if _SAVEZ_TAKES_ALLOW_PICKLE else {}
    atomic_write(path, lambda f: writer(f, **no_pickle, **arrays))


def _savez_takes_allow_pickle():
    import inspect
    try:
        return "allow_pickle" in inspect.signature(np.savez).parameters
    except (TypeError, ValueError):
        return False


_SAVEZ_TAKES_ALLOW_PICKLE = _savez_takes_allow_pickle()


def _storable(a, where):
    """``(array, manifest dtype string)`` for one parameter array, or a TypeError/ValueError naming ``where``."""
    dt = a.dtype
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(f"{where} has dtype {dt}: an npconv file holds plain arrays (numbers, bool, str, bytes); "
                        f"object and structured arrays are refused (they need pickle or cannot be loaded)")
    if not dt.isnative:
        a = a.astype(dt.newbyteorder("="))
        dt = a.dtype
    spec = dt.str.lstrip("<>=|") if dt.kind in "fiub" else str(dt)
    if np.dtype(spec) != dt:
        raise TypeError(f"{where} has dtype {dt}, which the npconv format cannot describe")
    if dt.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise ValueError(f"{where} contains {bad} non-finite value(s) (NaN or inf); npconv files hold finite "
                             f"weights only")
    return a, spec


def load(path):
    """Read a network written by ``save``. Never unpickles; validates the manifest and every array.

    Any failure (a corrupt, truncated, forged or foreign file, a bad manifest, an array that does not match it or
    holds NaN or inf, a layer that refuses its configuration) is a ValueError naming the file and, where it
    applies, the layer and the key; a missing file is a FileNotFoundError.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    try:
        size = os.path.getsize(path)
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            if _MANIFEST not in z.files:
                raise ValueError(f"it has no {_MANIFEST!r} manifest: not an npconv file")
            shape, dtype = _member_header(z, _MANIFEST, size)
            if dtype != np.uint8 or len(shape) != 1:
                raise ValueError(f"the manifest {_MANIFEST!r} must be a 1-D uint8 array, got {dtype}{list(shape)}")
            doc = json.loads(bytes(z[_MANIFEST]).decode("utf-8"))
            layers, input_shape, meta = _read_layers(doc, z, size)
        return Network(layers, input_shape=input_shape, meta=meta)
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"path: {path!r} is not a valid npconv file ({type(exc).__name__}: {exc})") from exc


def _is_int(v):
    return type(v) is int


def _read_layers(doc, z, size):
    """``(layers, input_shape, meta)`` from the manifest ``doc``, every array read from ``z`` and checked."""
    if not isinstance(doc, dict) or doc.get("format") != "npconv":
        raise ValueError("the manifest's format is not 'npconv'")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {doc.get('version')!r} is not supported (this npconv reads "
                         f"{FORMAT_VERSION})")
    input_shape = doc.get("input_shape")
    if input_shape is not None and not (isinstance(input_shape, list) and all(map(_is_int, input_shape))):
        raise ValueError(f"the manifest's input_shape must be null or a list of ints, got {input_shape!r}")
    meta = doc.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"the manifest's meta must be a JSON object, got {type(meta).__name__}")
    specs = doc.get("layers")
    if not isinstance(specs, list) or not specs:
        raise ValueError("the manifest lists no layers")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ValueError(f"layers[{i}] must be a JSON object, got {type(spec).__name__}")
        name, kind = spec.get("name"), spec.get("kind")
        if not isinstance(name, str) or not name:
            raise ValueError(f"layers[{i}]: the name must be a non-empty string, got {name!r}")
        if not isinstance(kind, str):
            raise ValueError(f"layer {name!r}: the kind must be a string, got {kind!r}")
        config, pspecs = spec.get("config", {}), spec.get("params", {})
        if not isinstance(config, dict):
            raise ValueError(f"layer {name!r}: the config must be a JSON object, got {type(config).__name__}")
        if not isinstance(pspecs, dict):
            raise ValueError(f"layer {name!r}: the params must be a JSON object, got {type(pspecs).__name__}")
        params = {}
        for pname, info in pspecs.items():
            if not (isinstance(info, dict) and isinstance(info.get("key"), str) and isinstance(info.get("dtype"), str)
                    and isinstance(info.get("shape"), list) and all(map(_is_int, info["shape"]))):
                raise ValueError(f"layer {name!r}: the manifest entry of array {pname!r} must be an object with "
                                 f"key (str), shape (list of ints) and dtype (str), got {info!r}")
            params[pname] = _read_array(z, name, pname, info, size)
        cls = layer_class(kind)
        try:
            layer = cls.from_config(config, params)
        except (ValueError, TypeError) as exc:
            raise_with_context(exc, f"layer {name!r} ({kind})")
        out.append((name, layer))
    return out, input_shape, meta


def _member_header(z, key, size):
    """``(shape, dtype)`` from the ``.npy`` header of the archive member ``key``, checked against the member's size
    and the archive's, so that no array larger than the file can hold is ever allocated."""
    names = z.zip.namelist()
    member = key + ".npy" if key + ".npy" in names else key
    info = z.zip.getinfo(member)
    with z.zip.open(member) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"array {key!r}: .npy format version {version} is not supported")
        offset = f.tell()
    if dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"array {key!r} has dtype {dtype}: object and structured arrays are refused")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if info.file_size != offset + nbytes:
        raise ValueError(f"array {key!r}: its header declares {dtype}{list(shape)} ({nbytes} bytes), the archive "
                         f"member holds {info.file_size - offset} bytes of data")
    if info.compress_type == zipfile.ZIP_STORED:
        stored_ok = info.compress_size == info.file_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:  # deflate expands at most 1032-fold
        stored_ok = info.file_size <= 1032 * info.compress_size + 1024
    else:
        raise ValueError(f"array {key!r}: zip compression method {info.compress_type} is not used by npconv files")
    if not stored_ok or info.compress_size > size:
        raise ValueError(f"array {key!r}: the archive member's sizes ({info.compress_size} bytes stored, "
                         f"{info.file_size} declared) do not fit a {size}-byte file")
    return tuple(shape), dtype


def _read_array(z, name, pname, info, size):
    """One parameter array: present, header matching the manifest (checked before reading), finite."""
    key = info["key"]
    if key not in z.files or key == _MANIFEST:
        raise ValueError(f"layer {name!r}: array {key!r} ({pname}) is missing")
    try:
        want = np.dtype(info["dtype"])
    except TypeError as exc:
        raise ValueError(f"layer {name!r}: array {key!r}: the manifest's dtype {info['dtype']!r} is not a "
                         f"NumPy dtype") from exc
    try:
        shape, dtype = _member_header(z, key, size)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from exc
    if list(shape) != list(info["shape"]) or dtype != want:
        raise ValueError(f"layer {name!r}: array {key!r} is {dtype}{list(shape)}, the manifest says "
                         f"{info['dtype']}{info['shape']}")
    a = z[key]
    if a.dtype.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise ValueError(f"layer {name!r}: array {key!r} ({pname}) contains {bad} non-finite value(s) "
                             f"(NaN or inf)")
    return a


# ---------------------------------------------------------------------------------------- PyTorch import
def from_torch(module, *, input_shape=None, meta=None, dtype=None):
    """Build a Network from a PyTorch ``nn.Sequential`` of supported layers (torch is imported by the caller).

    Supported: Conv2d (zero padding), BatchNorm2d directly after a Conv2d (folded into it, eval semantics, running
    statistics needed), Linear, ReLU, MaxPool2d, AvgPool2d, LocalResponseNorm, Flatten, Dropout, Softmax, nested
    Sequential. Layer names are the Sequential's child names (nested ones joined by '.'). ``dtype`` (float32 or
    float64) sets the weights' dtype; by default the module's parameter dtype is kept, and one NumPy layers cannot
    hold (float16, bfloat16) is a TypeError asking for ``dtype``.

    ``Softmax()`` without ``dim`` gets PyTorch's implicit (deprecated) choice, which depends on the input's number
    of dimensions: dim 1 for 2 or 4 and more. That number is known after a Conv2d, a pooling or an LRN (4) and
    after a Linear or a Flatten (2), otherwise from ``input_shape``; where it is unknown, or where PyTorch would
    pick dimension 0 (a 3-D input: the batch axis, which a Softmax layer cannot normalise over), it is a ValueError
    asking for an explicit ``dim``. Every error about one module (unsupported settings, NaN or inf weights, a
    dtype) is a ValueError or TypeError naming it.
    """
    from .layers import dense, simple
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float64 or None (the module's own), got {dtype}")
    pairs = list(_flatten_sequential(module))
    ndim = None if input_shape is None else len(tuple(input_shape)) + 1  # of the batched input, when known
    layers = []
    i = 0
    while i < len(pairs):
        name, m = pairs[i]
        t = type(m).__name__
        try:
            if t == "Conv2d":
                w = _t2n(m.weight, dtype, f"layer {name!r} (Conv2d): weight")
                b = None if m.bias is None else _t2n(m.bias, dtype, f"layer {name!r} (Conv2d): bias")
                if m.padding_mode != "zeros":
                    raise ValueError(f"layer {name!r}: padding_mode {m.padding_mode!r} is not supported "
                                     f"(only 'zeros')")
                pad = m.padding
                if isinstance(pad, str):
                    if pad == "valid":
                        pad = (0, 0)
                    else:
                        raise ValueError(f"layer {name!r}: padding {pad!r} is not supported; give explicit padding")
                if i + 1 < len(pairs) and type(pairs[i + 1][1]).__name__ == "BatchNorm2d":
                    w, b = _fold_bn(w, b, *pairs[i + 1])
                    i += 1
                layers.append((name, dense.Conv2d(w, b, stride=tuple(m.stride), padding=tuple(pad),
                                                  dilation=tuple(m.dilation), groups=m.groups)))
                ndim = 4
            elif t == "Linear":
                layers.append((name, dense.Linear(
                    _t2n(m.weight, dtype, f"layer {name!r} (Linear): weight"),
                    None if m.bias is None else _t2n(m.bias, dtype, f"layer {name!r} (Linear): bias"))))
                ndim = 2  # npconv's Linear flattens its input
            elif t == "ReLU":
                layers.append((name, simple.ReLU()))
            elif t == "MaxPool2d":
                if _pair(m.dilation) != (1, 1) or m.return_indices:
                    raise ValueError(f"layer {name!r}: MaxPool2d with dilation or return_indices is not supported")
                layers.append((name, simple.MaxPool2d(_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                                                      padding=_pair(m.padding), ceil_mode=bool(m.ceil_mode))))
                ndim = 4
            elif t == "AvgPool2d":
                if m.divisor_override is not None:
                    raise ValueError(f"layer {name!r}: AvgPool2d divisor_override is not supported")
                layers.append((name, simple.AvgPool2d(_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                                                      padding=_pair(m.padding), ceil_mode=bool(m.ceil_mode),
                                                      count_include_pad=bool(m.count_include_pad))))
                ndim = 4
            elif t == "LocalResponseNorm":
                layers.append((name, simple.LocalResponseNorm(size=int(m.size), alpha=float(m.alpha),
                                                              beta=float(m.beta), k=float(m.k))))
                ndim = 4
            elif t == "Flatten":
                if m.start_dim != 1 or m.end_dim != -1:
                    raise ValueError(f"layer {name!r}: only Flatten(start_dim=1, end_dim=-1) is supported")
                layers.append((name, simple.Flatten()))
                ndim = 2
            elif t == "Dropout":
                layers.append((name, simple.Dropout(p=float(m.p))))
            elif t == "Softmax":
                layers.append((name, simple.Softmax(axis=_softmax_axis(name, m.dim, ndim))))
            elif t == "BatchNorm2d":
                raise ValueError(f"layer {name!r}: BatchNorm2d is supported only directly after a Conv2d")
            else:
                raise ValueError(f"layer {name!r}: PyTorch module {t} is not supported by the importer")
        except (ValueError, TypeError) as exc:
            if str(exc).startswith("layer "):
                raise
            raise_with_context(exc, f"layer {name!r} ({t})")  # a layer constructor's error: name the module
        i += 1
    return Network(layers, input_shape=input_shape, meta=meta)


def _softmax_axis(name, dim, ndim):
    """The Softmax layer's axis for ``nn.Softmax(dim)`` on an input of ``ndim`` dimensions (None: unknown)."""
    if dim is not None:
        return int(dim)
    if ndim is None:
        raise ValueError(f"layer {name!r}: Softmax() without dim: PyTorch picks the dimension from the number of "
                         f"dimensions of its input, unknown here; give Softmax(dim=...) (or from_torch's "
                         f"input_shape)")
    if ndim in (0, 1, 3):
        raise ValueError(f"layer {name!r}: Softmax() without dim on a {ndim}-D input normalises over dimension 0, "
                         f"the batch axis, in PyTorch; a Softmax layer cannot: give Softmax(dim=...)")
    return 1  # PyTorch's implicit choice for 2-D and 4-D (and more) inputs


def _flatten_sequential(module, prefix=""):
    if type(module).__name__ != "Sequential":
        raise TypeError(f"module must be a torch.nn.Sequential, got {type(module).__name__}")
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if type(child).__name__ == "Sequential":
            yield from _flatten_sequential(child, full + ".")
        else:
            yield full, child


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _t2n(t, dtype, where):
    """A torch tensor as a C-contiguous NumPy array (in ``dtype`` when given), float and finite, or a
    ValueError/TypeError naming ``where`` ("layer 'conv1' (Conv2d): weight")."""
    if not hasattr(t, "detach"):
        raise TypeError(f"{where} must be a torch tensor, got {type(t).__name__} (a quantized or custom module?)")
    t = t.detach().cpu()
    if not t.is_floating_point():
        raise TypeError(f"{where} has dtype {t.dtype}; only floating-point weights can be imported")
    try:
        a = t.numpy()
    except TypeError:  # bfloat16 and other dtypes NumPy has no type for
        if dtype is None:
            raise TypeError(f"{where} has dtype {t.dtype}, which NumPy cannot hold; pass dtype=np.float32 or "
                            f"np.float64 to convert the weights") from None
        a = t.double().numpy()
    if dtype is not None:
        a = a.astype(dtype)
    elif a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where} has dtype {a.dtype}; npconv layers hold float32 or float64 weights: pass "
                        f"dtype=np.float32 or np.float64 to convert them")
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        raise ValueError(f"{where} contains {bad} non-finite value(s) (NaN or inf)")
    return np.ascontiguousarray(a)


def _fold_bn(w, b, bn_name, bn):
    """Fold an eval-mode BatchNorm2d into the conv before it (computed in float64)."""
    where = f"layer {bn_name!r} (BatchNorm2d)"
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{where}: a BatchNorm2d without running statistics (track_running_stats=False) "
                         f"normalises every batch by its own statistics, even in eval mode, and cannot be folded "
                         f"into the conv before it; not supported")
    dt = w.dtype
    mean = _t2n(bn.running_mean, np.float64, f"{where}: running_mean")
    var = _t2n(bn.running_var, np.float64, f"{where}: running_var")
    gamma = _t2n(bn.weight, np.float64, f"{where}: weight") if bn.weight is not None else np.ones_like(mean)
    beta = _t2n(bn.bias, np.float64, f"{where}: bias") if bn.bias is not None else np.zeros_like(mean)
    if not (var + bn.eps > 0).all():
        raise ValueError(f"{where}: running_var + eps must be > 0, got a minimum of {float((var + bn.eps).min())}")
    scale = gamma / np.sqrt(var + bn.eps)
    w64 = w.astype(np.float64) * scale[:, None, None, None]
    b64 = ((b.astype(np.float64) if b is not None else 0.0) - mean) * scale + beta
    return w64.astype(dt), b64.astype(dt)


def load_state_dict(net, state_dict, *, strict=True):
    """A NEW network: ``net`` with its arrays taken from a PyTorch-style ``state_dict``.

    Keys are ``"<layer name>.<param>"`` (e.g. ``"conv1.weight"``). Values may be torch tensors (bfloat16 included)
    or NumPy arrays of real numbers; each is converted to the dtype of the array it replaces. A missing, extra
    (when ``strict``) or wrongly shaped entry, one that is not real numbers, or one with NaN or inf (after the
    conversion) is a ValueError or TypeError naming the layer and the key.
    """
    from collections.abc import Mapping
    if not isinstance(net, Network):
        raise TypeError(f"net must be an npconv Network, got {type(net).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of key -> array, got {type(state_dict).__name__}")
    used = set()
    new_layers = []
    for name, layer in net.items():
        params = {}
        for pname, cur in layer.params.items():
            key = f"{name}.{pname}"
            if key not in state_dict:
                raise ValueError(f"layer {name!r}: state_dict has no key {key!r}")
            where = f"layer {name!r}: state_dict[{key!r}]"
            a = _sd_array(state_dict[key], where)
            if tuple(a.shape) != tuple(cur.shape):
                raise ValueError(f"{where} has shape {tuple(a.shape)}, the layer needs {tuple(cur.shape)}")
            dt = to_numpy(cur).dtype
            with np.errstate(over="ignore", invalid="ignore"):
                a = np.ascontiguousarray(a.astype(dt))
            if dt.kind in "fc":
                bad = int(np.count_nonzero(~np.isfinite(a)))
                if bad:
                    raise ValueError(f"{where} contains {bad} non-finite value(s) (NaN or inf) as {dt}")
            params[pname] = a
            used.add(key)
        if params:
            try:
                layer = layer_class(layer.kind).from_config(layer.config(), params)
            except (ValueError, TypeError) as exc:
                raise_with_context(exc, f"layer {name!r} ({layer.kind})")
        new_layers.append((name, layer))
    extra = sorted(set(state_dict) - used)
    if strict and extra:
        raise ValueError(f"state_dict has keys that match no layer parameter: {extra}")
    return Network(new_layers, input_shape=net.input_shape, meta=net.meta)


def _sd_array(v, where):
    """A state_dict value (torch tensor or array-like of real numbers) as a NumPy array."""
    if hasattr(v, "detach"):
        t = v.detach().cpu()
        try:
            a = t.numpy()
        except TypeError:  # bfloat16 and other dtypes NumPy has no type for: widen them first (exactly)
            if not t.is_floating_point():
                raise TypeError(f"{where} has dtype {t.dtype}; expected real numbers") from None
            a = t.double().numpy()
    else:
        a = np.asarray(v)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{where} has dtype {a.dtype}; expected real numbers (float or int)")
    return a
