"""The npconv weight-file format, atomic saving, safe loading, and the PyTorch importer.

Format (version 1): one ``.npz`` archive (a zip of ``.npy`` files, as written by ``numpy.savez``) holding
- ``__npconv__``: a uint8 array, the UTF-8 bytes of a JSON document
  ``{"format": "npconv", "version": 1, "input_shape": [...] | null, "meta": {...},
     "layers": [{"name": str, "kind": str, "config": {...},
                 "params": {param: {"key": str, "shape": [...], "dtype": "float32"|"float64"|"int64"...}}}]}``
- one array per layer parameter, under the key named in the manifest (``"<layer index>.<param>"``).
Loading uses ``numpy.load(..., allow_pickle=False)``: no code runs on load. Every array is checked against the
manifest (present, shape, dtype); a corrupt, truncated or foreign file is a ValueError naming the path.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from ._backend import to_numpy
from ._fileio import atomic_write
from .layers import layer_class
from .network import Network

__all__ = ["save", "load", "from_torch", "load_state_dict", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MANIFEST = "__npconv__"


def save(net, path, *, compress=False):
    """Write ``net`` to ``path`` (an ``.npz`` file) atomically: a reader never sees a half-written file."""
    if not isinstance(net, Network):
        raise TypeError(f"net must be an npconv Network, got {type(net).__name__}")
    arrays, layers = {}, []
    for i, (name, layer) in enumerate(net.items()):
        params = {}
        for pname, arr in layer.params.items():
            a = to_numpy(arr)
            key = f"{i}.{pname}"
            arrays[key] = a
            params[pname] = {"key": key, "shape": list(a.shape), "dtype": a.dtype.str.lstrip("<>=|")
                             if a.dtype.kind in "fiub" else str(a.dtype)}
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
    atomic_write(path, lambda f: writer(f, **arrays))


def load(path):
    """Read a network written by ``save``. Never unpickles; validates the manifest and every array."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            if _MANIFEST not in z.files:
                raise ValueError(f"it has no {_MANIFEST!r} manifest: not an npconv file")
            doc = json.loads(bytes(z[_MANIFEST]).decode("utf-8"))
            layers = _read_layers(doc, z)
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, UnicodeDecodeError, json.JSONDecodeError,
            ValueError, TypeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"path: {path!r} is not a valid npconv file ({type(exc).__name__}: {exc})") from exc
    return Network(layers, input_shape=doc.get("input_shape"), meta=doc.get("meta") or {})


def _read_layers(doc, z):
    if not isinstance(doc, dict) or doc.get("format") != "npconv":
        raise ValueError("the manifest's format is not 'npconv'")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {doc.get('version')!r} is not supported (this npconv reads "
                         f"{FORMAT_VERSION})")
    specs = doc.get("layers")
    if not isinstance(specs, list) or not specs:
        raise ValueError("the manifest lists no layers")
    out = []
    for spec in specs:
        name, kind = spec["name"], spec["kind"]
        params = {}
        for pname, info in spec.get("params", {}).items():
            key = info["key"]
            if key not in z.files:
                raise ValueError(f"layer {name!r}: array {key!r} ({pname}) is missing")
            a = z[key]
            if list(a.shape) != list(info["shape"]) or a.dtype != np.dtype(info["dtype"]):
                raise ValueError(f"layer {name!r}: array {key!r} is {a.dtype}{list(a.shape)}, the manifest says "
                                 f"{info['dtype']}{info['shape']}")
            params[pname] = a
        out.append((name, layer_class(kind).from_config(spec.get("config", {}), params)))
    return out


# ---------------------------------------------------------------------------------------- PyTorch import
def from_torch(module, *, input_shape=None, meta=None, dtype=None):
    """Build a Network from a PyTorch ``nn.Sequential`` of supported layers (torch is imported by the caller).

    Supported: Conv2d (zero padding), BatchNorm2d directly after a Conv2d (folded into it, eval semantics),
    Linear, ReLU, MaxPool2d, AvgPool2d, LocalResponseNorm, Flatten, Dropout, Softmax, nested Sequential.
    Layer names are the Sequential's child names (nested ones joined by '.'). ``dtype`` (float32/float64) sets
    the weights' dtype; by default the module's parameter dtype is kept.
    """
    from .layers import dense, simple
    pairs = list(_flatten_sequential(module))
    layers = []
    i = 0
    while i < len(pairs):
        name, m = pairs[i]
        t = type(m).__name__
        if t == "Conv2d":
            w, b = _t2n(m.weight, dtype), (None if m.bias is None else _t2n(m.bias, dtype))
            if m.padding_mode != "zeros":
                raise ValueError(f"layer {name!r}: padding_mode {m.padding_mode!r} is not supported (only 'zeros')")
            pad = m.padding
            if isinstance(pad, str):
                if pad == "valid":
                    pad = (0, 0)
                else:
                    raise ValueError(f"layer {name!r}: padding {pad!r} is not supported; give explicit padding")
            if i + 1 < len(pairs) and type(pairs[i + 1][1]).__name__ == "BatchNorm2d":
                w, b = _fold_bn(w, b, pairs[i + 1][1], dtype)
                i += 1
            layers.append((name, dense.Conv2d(w, b, stride=tuple(m.stride), padding=tuple(pad),
                                              dilation=tuple(m.dilation), groups=m.groups)))
        elif t == "Linear":
            layers.append((name, dense.Linear(_t2n(m.weight, dtype),
                                              None if m.bias is None else _t2n(m.bias, dtype))))
        elif t == "ReLU":
            layers.append((name, simple.ReLU()))
        elif t == "MaxPool2d":
            if _pair(m.dilation) != (1, 1) or m.return_indices:
                raise ValueError(f"layer {name!r}: MaxPool2d with dilation or return_indices is not supported")
            layers.append((name, simple.MaxPool2d(_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                                                  padding=_pair(m.padding), ceil_mode=bool(m.ceil_mode))))
        elif t == "AvgPool2d":
            if m.divisor_override is not None:
                raise ValueError(f"layer {name!r}: AvgPool2d divisor_override is not supported")
            layers.append((name, simple.AvgPool2d(_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                                                  padding=_pair(m.padding), ceil_mode=bool(m.ceil_mode),
                                                  count_include_pad=bool(m.count_include_pad))))
        elif t == "LocalResponseNorm":
            layers.append((name, simple.LocalResponseNorm(size=int(m.size), alpha=float(m.alpha),
                                                          beta=float(m.beta), k=float(m.k))))
        elif t == "Flatten":
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(f"layer {name!r}: only Flatten(start_dim=1, end_dim=-1) is supported")
            layers.append((name, simple.Flatten()))
        elif t == "Dropout":
            layers.append((name, simple.Dropout(p=float(m.p))))
        elif t == "Softmax":
            layers.append((name, simple.Softmax(axis=-1 if m.dim is None else int(m.dim))))
        elif t == "BatchNorm2d":
            raise ValueError(f"layer {name!r}: BatchNorm2d is supported only directly after a Conv2d")
        else:
            raise ValueError(f"layer {name!r}: PyTorch module {t} is not supported by the importer")
        i += 1
    return Network(layers, input_shape=input_shape, meta=meta)


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


def _t2n(t, dtype):
    a = t.detach().cpu().numpy()
    if dtype is not None:
        a = a.astype(dtype)
    return np.ascontiguousarray(a)


def _fold_bn(w, b, bn, dtype):
    """Fold an eval-mode BatchNorm2d into the conv before it (computed in float64)."""
    dt = w.dtype
    mean = _t2n(bn.running_mean, np.float64)
    var = _t2n(bn.running_var, np.float64)
    gamma = _t2n(bn.weight, np.float64) if bn.weight is not None else np.ones_like(mean)
    beta = _t2n(bn.bias, np.float64) if bn.bias is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + bn.eps)
    w64 = w.astype(np.float64) * scale[:, None, None, None]
    b64 = ((b.astype(np.float64) if b is not None else 0.0) - mean) * scale + beta
    return w64.astype(dt), b64.astype(dt)


def load_state_dict(net, state_dict, *, strict=True):
    """A NEW network: ``net`` with its arrays taken from a PyTorch-style ``state_dict``.

    Keys are ``"<layer name>.<param>"`` (e.g. ``"conv1.weight"``). A missing, extra (when ``strict``) or wrongly
    shaped entry is a ValueError naming the layer and the key. Values may be torch tensors or NumPy arrays.
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be an npconv Network, got {type(net).__name__}")
    sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in state_dict.items()}
    used = set()
    new_layers = []
    for name, layer in net.items():
        params = {}
        for pname, cur in layer.params.items():
            key = f"{name}.{pname}"
            if key not in sd:
                raise ValueError(f"layer {name!r}: state_dict has no key {key!r}")
            a = sd[key]
            if tuple(a.shape) != tuple(cur.shape):
                raise ValueError(f"layer {name!r}: state_dict[{key!r}] has shape {tuple(a.shape)}, "
                                 f"the layer needs {tuple(cur.shape)}")
            params[pname] = np.ascontiguousarray(a.astype(to_numpy(cur).dtype))
            used.add(key)
        new_layers.append((name, layer_class(layer.kind).from_config(layer.config(), params) if params
                           else layer))
    extra = sorted(set(sd) - used)
    if strict and extra:
        raise ValueError(f"state_dict has keys that match no layer parameter: {extra}")
    return Network(new_layers, input_shape=net.input_shape, meta=net.meta)
