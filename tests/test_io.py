import io
import json
import os
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import npconv
from npconv import Network
from npconv.io import from_torch, load_state_dict
from npconv.layers import Layer, register_layer
from tests.test_network import small_net


def test_roundtrip_preserves_everything(tmp_path, rng):
    net, _ = small_net(rng)
    p = tmp_path / "net.npz"
    npconv.save(net, p)
    back = npconv.load(p)
    assert back.names == net.names and back.input_shape == net.input_shape and back.meta == net.meta
    x = rng.standard_normal((2, 3, 5, 5))
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    for (n1, l1), (n2, l2) in zip(net, back):
        assert l1.config() == l2.config()
        for k in l1.params:
            np.testing.assert_array_equal(l1.params[k], l2.params[k])


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, rng, monkeypatch):
    net, _ = small_net(rng)
    p = tmp_path / "net.npz"
    npconv.save(net, p)
    good = p.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        npconv.save(net, p)
    assert p.read_bytes() == good                       # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["net.npz"]  # no temporary left behind


def test_load_rejects_truncated_corrupt_and_foreign_files(tmp_path, rng):
    net, _ = small_net(rng)
    p = tmp_path / "net.npz"
    npconv.save(net, p)
    data = p.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"path: .*trunc.npz' is not a valid npconv file"):
        npconv.load(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="is not a valid npconv file"):
        npconv.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not an npconv file"):
        npconv.load(tmp_path / "foreign.npz")
    with pytest.raises(FileNotFoundError, match="no such file"):
        npconv.load(tmp_path / "missing.npz")


def _rewrite(src, dst, edit_manifest=None, drop=None, replace=None):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    doc = json.loads(bytes(arrays["__npconv__"]).decode())
    if edit_manifest:
        edit_manifest(doc)
    arrays["__npconv__"] = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    for k in drop or ():
        del arrays[k]
    arrays.update(replace or {})
    np.savez(dst, **arrays)


def test_load_checks_manifest_against_arrays(tmp_path, rng):
    net, _ = small_net(rng)
    p = tmp_path / "net.npz"
    npconv.save(net, p)
    _rewrite(p, tmp_path / "a.npz", drop=["0.weight"])
    with pytest.raises(ValueError, match=r"layer 'conv1': array '0.weight' \(weight\) is missing"):
        npconv.load(tmp_path / "a.npz")
    _rewrite(p, tmp_path / "b.npz", replace={"0.weight": np.zeros((4, 3, 3, 2))})
    with pytest.raises(ValueError, match=r"layer 'conv1': array '0.weight' is float64\[4, 3, 3, 2\]"):
        npconv.load(tmp_path / "b.npz")
    _rewrite(p, tmp_path / "c.npz", edit_manifest=lambda d: d["layers"][0].update(kind="quantum"))
    with pytest.raises(ValueError, match="unknown layer kind 'quantum'"):
        npconv.load(tmp_path / "c.npz")
    _rewrite(p, tmp_path / "d.npz", edit_manifest=lambda d: d.update(version=99))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        npconv.load(tmp_path / "d.npz")
    w = np.array(net["conv1"].weight)
    w[0, 0, 0, 0] = np.nan
    _rewrite(p, tmp_path / "e.npz", replace={"0.weight": w})
    # the error names the file, the layer and the key (docs/format.md)
    with pytest.raises(ValueError, match=r"e\.npz' is not a valid npconv file .*layer 'conv1': array '0\.weight' "
                                         r"\(weight\) contains 1 non-finite"):
        npconv.load(tmp_path / "e.npz")


def test_load_never_unpickles(tmp_path, rng):
    # an object array inside the archive needs pickle: it must be refused, and nothing may run
    net, _ = small_net(rng)
    p = tmp_path / "net.npz"
    npconv.save(net, p)
    obj = np.empty(1, dtype=object)
    obj[0] = {"x": 1}
    _rewrite(p, tmp_path / "pkl.npz", replace={"0.weight": obj})
    with pytest.raises(ValueError, match="not a valid npconv file"):
        npconv.load(tmp_path / "pkl.npz")


def test_save_rejects_non_network(tmp_path):
    with pytest.raises(TypeError, match="net must be an npconv Network, got dict"):
        npconv.save({}, tmp_path / "x.npz")


@pytest.mark.parametrize("label, edit, words", [
    ("params=[]", lambda d: d["layers"][0].update(params=[]), ["layer 'conv1'", "params"]),
    ("config=[]", lambda d: d["layers"][0].update(config=[]), ["layer 'conv1'", "config"]),
    ("name=5", lambda d: d["layers"][0].update(name=5), ["layers[0]", "name"]),
    ("kind=None", lambda d: d["layers"][1].update(kind=None), ["layer 'relu1'", "kind"]),
    ("layer not an object", lambda d: d["layers"].__setitem__(1, "relu"), ["layers[1]"]),
    ("duplicate names", lambda d: d["layers"][1].update(name="conv1"), ["'conv1' is used twice"]),
    ("input_shape=3", lambda d: d.update(input_shape=3), ["input_shape"]),
    ("input_shape=[3, 'a']", lambda d: d.update(input_shape=[3, "a", 5]), ["input_shape"]),
    ("meta='x'", lambda d: d.update(meta="x"), ["meta"]),
    ("param entry not an object", lambda d: d["layers"][0]["params"].update(weight="0.weight"),
     ["layer 'conv1'", "'weight'"]),
    ("param shape of str", lambda d: d["layers"][0]["params"]["weight"].update(shape="4,3,3,3"),
     ["layer 'conv1'", "'weight'"]),
    ("bad dtype", lambda d: d["layers"][0]["params"]["weight"].update(dtype="float99"),
     ["layer 'conv1'", "'0.weight'", "float99"]),
    ("groups=10**30", lambda d: d["layers"][0]["config"].update(groups=10 ** 30), ["layer 'conv1'", "groups"]),
    ("unknown config key", lambda d: d["layers"][1]["config"].update(bogus=1), ["layer 'relu1'", "bogus"]),
])
def test_load_bad_manifest_is_a_value_error_naming_the_file(tmp_path, rng, label, edit, words):
    # docs/format.md: any failure is a ValueError naming the file (none escapes as a raw TypeError/AttributeError)
    net, _ = small_net(rng)
    p = tmp_path / "net.npz"
    npconv.save(net, p)
    _rewrite(p, tmp_path / "bad.npz", edit_manifest=edit)
    with pytest.raises(ValueError, match=r"path: '.*bad\.npz' is not a valid npconv file") as info:
        npconv.load(tmp_path / "bad.npz")
    for w in words:
        assert w in str(info.value), (label, w, str(info.value))


def _npy_header(shape, descr="<f8"):
    from numpy.lib import format as fmt
    b = io.BytesIO()
    fmt.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
    return b.getvalue()


@pytest.mark.parametrize("manifest_too", [False, True])
def test_load_checks_array_headers_before_reading(tmp_path, rng, manifest_too):
    # a forged .npy header declaring a huge array must not be allocated (it was a MemoryError): ValueError naming the
    # file, the layer and the key, whether the manifest disagrees with the header or was forged to agree
    net, _ = small_net(rng)
    p = tmp_path / "net.npz"
    npconv.save(net, p)
    huge = (4, 3, 3, 10 ** 11)
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    doc = json.loads(bytes(arrays["__npconv__"]).decode())
    if manifest_too:
        doc["layers"][0]["params"]["weight"]["shape"] = list(huge)
    arrays["__npconv__"] = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    forged = tmp_path / "huge.npz"
    with zipfile.ZipFile(forged, "w") as zf:
        for k, a in arrays.items():
            if k == "0.weight":
                zf.writestr("0.weight.npy", _npy_header(huge) + a.tobytes())
            else:
                b = io.BytesIO()
                np.save(b, a)
                zf.writestr(k + ".npy", b.getvalue())
    with pytest.raises(ValueError, match=r"huge\.npz' is not a valid npconv file .*layer 'conv1': array '0\.weight'"):
        npconv.load(forged)
    # the manifest itself is checked the same way
    with zipfile.ZipFile(tmp_path / "huge_manifest.npz", "w") as zf:
        zf.writestr("__npconv__.npy", _npy_header((10 ** 12,), "|u1") + b"{}")
    with pytest.raises(ValueError, match=r"huge_manifest\.npz' is not a valid npconv file .*'__npconv__'"):
        npconv.load(tmp_path / "huge_manifest.npz")


@register_layer
class _Table(Layer):
    """A custom layer holding one arbitrary array (for the format's checks of what it stores)."""
    kind = "test_io_table"

    def __init__(self, table=None):
        super().__init__()
        self.params = {} if table is None else {"table": table}

    @classmethod
    def from_config(cls, config, params):
        return cls(**params)

    def forward(self, x):
        return x


@pytest.mark.parametrize("table, err, what", [
    (np.array([1, "a"], dtype=object), TypeError, "dtype object"),
    (np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), TypeError, "structured"),
    (np.array([1.0, np.nan]), ValueError, "1 non-finite"),
    (np.array([np.inf], np.float32), ValueError, "1 non-finite"),
])
def test_save_refuses_what_load_would_refuse(tmp_path, table, err, what):
    net = Network([("ok", _Table(np.zeros(2))), ("t", _Table(table))])
    p = tmp_path / "t.npz"
    with pytest.raises(err, match=r"layer 't': array 'table' \(key '1\.table'\)") as info:
        npconv.save(net, p)
    assert what in str(info.value)
    assert os.listdir(tmp_path) == []  # nothing written (no pickle can reach the disk)


def test_save_stores_plain_and_non_native_arrays_that_load_accepts(tmp_path):
    tables = [np.arange(6, dtype=">f8").reshape(2, 3), np.array(["ab", "c"]), np.array([1, 2], np.int16),
              np.array([True, False])]
    net = Network([(f"t{i}", _Table(t)) for i, t in enumerate(tables)])
    npconv.save(net, tmp_path / "t.npz")
    back = npconv.load(tmp_path / "t.npz")
    for i, t in enumerate(tables):
        np.testing.assert_array_equal(back[f"t{i}"].params["table"], t)
        assert back[f"t{i}"].params["table"].dtype.isnative


@pytest.mark.parametrize("name", ["a" * 238 + ".npz", "a" * 251 + ".npz", "\u20ac" * 83 + ".npz"])
def test_save_to_a_long_file_name(tmp_path, rng, name):
    # names of up to NAME_MAX (255) bytes: the temporary file's name must not be longer than the target's limit
    assert len(os.fsencode(name)) <= 255
    net, _ = small_net(rng)
    npconv.save(net, tmp_path / name)
    assert os.listdir(tmp_path) == [name]          # renamed into place, no temporary left
    assert npconv.load(tmp_path / name).names == net.names
    npconv.save(net, tmp_path / name)              # replacing it works as well
    assert os.listdir(tmp_path) == [name]


# ------------------------------------------------------------------------------------- PyTorch importer
@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_torch_matches_torch_forward(rng, dtype):
    import torch
    from collections import OrderedDict
    nn = torch.nn
    torch.manual_seed(0)
    seq = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 5, padding=2)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)), ("norm1", nn.LocalResponseNorm(5, 1e-3, 0.75, 2.0)),
        ("conv2", nn.Conv2d(8, 6, 3, padding=1, groups=2)), ("relu2", nn.ReLU()),
        ("pool2", nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)),
        ("flat", nn.Flatten()), ("fc1", nn.Linear(6 * 4 * 4, 20)), ("drop", nn.Dropout(0.5)),
        ("fc2", nn.Linear(20, 10))]))
    with torch.no_grad():  # non-trivial batch-norm statistics
        seq.bn1.running_mean.uniform_(-1, 1)
        seq.bn1.running_var.uniform_(0.5, 2)
        seq.bn1.weight.uniform_(0.5, 1.5)
        seq.bn1.bias.uniform_(-0.5, 0.5)
    seq = seq.to(torch.float64 if dtype == np.float64 else torch.float32).eval()
    net = from_torch(seq, input_shape=(3, 15, 15))
    assert "bn1" not in net.names
    x = rng.standard_normal((4, 3, 15, 15)).astype(dtype)
    with torch.no_grad():
        ref = seq(torch.from_numpy(x)).numpy()
    tol = 2e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(net.forward(x), ref, rtol=tol, atol=tol)


@pytest.mark.torch
def test_from_torch_rejects_unsupported():
    import torch
    with pytest.raises(ValueError, match="layer '1': PyTorch module GELU is not supported"):
        from_torch(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.GELU()))
    with pytest.raises(TypeError, match="module must be a torch.nn.Sequential, got Linear"):
        from_torch(torch.nn.Linear(2, 2))


def test_load_state_dict_errors_name_layer_and_key(rng):
    net, ws = small_net(rng)
    sd = {f"{n}.{k}": np.array(v) for n, l in net for k, v in l.params.items()}
    new = load_state_dict(net, {k: v * 2 for k, v in sd.items()})
    np.testing.assert_array_equal(new["fc"].weight, 2 * net["fc"].weight)
    with pytest.raises(ValueError, match=r"layer 'fc': state_dict has no key 'fc.bias'"):
        load_state_dict(net, {k: v for k, v in sd.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match=r"layer 'conv1': state_dict\['conv1.weight'\] has shape \(4, 3, 3\)"):
        load_state_dict(net, dict(sd, **{"conv1.weight": np.zeros((4, 3, 3))}))
    with pytest.raises(ValueError, match=r"keys that match no layer parameter: \['extra.weight'\]"):
        load_state_dict(net, dict(sd, **{"extra.weight": np.zeros(1)}))


@pytest.mark.torch
def test_from_torch_errors_name_the_module():
    import torch
    nn = torch.nn
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        seq[3].bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"layer '3' \(Linear\): bias contains 1 non-finite"):
        from_torch(seq)
    with pytest.raises(TypeError, match=r"layer '0' \(Conv2d\): weight has dtype float16.*dtype=np\.float32"):
        from_torch(nn.Sequential(nn.Conv2d(3, 4, 3)).half())
    with pytest.raises(TypeError, match=r"layer '0' \(Conv2d\): weight has dtype torch\.bfloat16.*dtype=np\.float32"):
        from_torch(nn.Sequential(nn.Conv2d(3, 4, 3)).to(torch.bfloat16))
    with pytest.raises(TypeError, match="dtype must be float32, float64 or None"):
        from_torch(nn.Sequential(nn.Conv2d(3, 4, 3)), dtype=np.float16)
    # with dtype= the weights are converted (exactly: bfloat16 -> float32 widens)
    bf = nn.Sequential(nn.Conv2d(3, 4, 3)).to(torch.bfloat16)
    net = from_torch(bf, dtype=np.float32)
    np.testing.assert_array_equal(net["0"].weight, bf[0].weight.detach().float().numpy())
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var[2] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'bn' \(BatchNorm2d\): running_var contains 1 non-finite"):
        from_torch(nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 4, 3)), ("bn", bn)])))


@pytest.mark.torch
def test_from_torch_refuses_batchnorm_without_running_stats():
    import torch
    nn = torch.nn
    seq = nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 4, 3)),
                                     ("bn", nn.BatchNorm2d(4, track_running_stats=False))]))
    with pytest.raises(ValueError, match=r"layer 'bn' \(BatchNorm2d\): .*running statistics"):
        from_torch(seq)


@pytest.mark.torch
@pytest.mark.parametrize("make, input_shape, shape", [
    (lambda nn: [nn.Conv2d(3, 4, 1), nn.Softmax()], None, (2, 3, 3, 5)),            # 4-D: PyTorch uses dim 1
    (lambda nn: [nn.Flatten(), nn.Linear(12, 5), nn.Softmax()], None, (3, 3, 2, 2)),  # 2-D: dim 1
    (lambda nn: [nn.Softmax()], (3, 4, 5), (2, 3, 4, 5)),                            # known from input_shape
    (lambda nn: [nn.ReLU(), nn.Softmax()], (7,), (2, 7)),
    (lambda nn: [nn.Conv2d(3, 4, 1), nn.Softmax(dim=-1)], None, (2, 3, 3, 5)),
])
def test_from_torch_softmax_without_dim_matches_torch(rng, make, input_shape, shape):
    import warnings

    import torch
    seq = torch.nn.Sequential(*make(torch.nn)).eval()
    x = rng.standard_normal(shape).astype(np.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's deprecation warning for the implicit dim
        ref = seq(torch.from_numpy(x)).numpy()
    net = from_torch(seq, input_shape=input_shape)
    np.testing.assert_allclose(net.forward(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.torch
def test_from_torch_softmax_without_dim_refused_where_ambiguous():
    import torch
    nn = torch.nn
    with pytest.raises(ValueError, match=r"layer '0': Softmax\(\) without dim.*give Softmax\(dim=\.\.\.\)"):
        from_torch(nn.Sequential(nn.Softmax()))                        # the input's dimensions are unknown
    with pytest.raises(ValueError, match=r"layer '0': Softmax\(\) without dim on a 3-D input .*batch axis"):
        from_torch(nn.Sequential(nn.Softmax()), input_shape=(4, 5))   # PyTorch would normalise over the batch
    with pytest.raises(ValueError, match=r"layer '0' \(Softmax\): axis must not be 0"):
        from_torch(nn.Sequential(nn.Softmax(dim=0)))


def test_load_state_dict_bad_values_name_layer_and_key(rng):
    net, _ = small_net(rng)
    sd = {f"{n}.{k}": np.array(v) for n, l in net for k, v in l.params.items()}
    bad = dict(sd, **{"fc.bias": np.full(5, np.nan)})
    with pytest.raises(ValueError, match=r"layer 'fc': state_dict\['fc\.bias'\] contains 5 non-finite"):
        load_state_dict(net, bad)
    net32, _ = small_net(rng, np.float32)   # 1e40 overflows float32: the converted value is checked
    with pytest.raises(ValueError, match=r"layer 'fc': state_dict\['fc\.bias'\] contains 5 non-finite .* float32"):
        load_state_dict(net32, dict(sd, **{"fc.bias": np.full(5, 1e40)}))
    with pytest.raises(TypeError, match=r"layer 'fc': state_dict\['fc\.bias'\] has dtype complex128"):
        load_state_dict(net, dict(sd, **{"fc.bias": np.ones(5) * 1j}))
    with pytest.raises(TypeError, match=r"layer 'fc': state_dict\['fc\.bias'\] has dtype object"):
        load_state_dict(net, dict(sd, **{"fc.bias": None}))
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_state_dict(net, [1, 2])


@pytest.mark.torch
def test_load_state_dict_takes_bfloat16_and_names_nan_tensors(rng):
    import torch
    net, _ = small_net(rng)
    sd = {f"{n}.{k}": torch.from_numpy(np.array(v)) for n, l in net for k, v in l.params.items()}
    half = torch.linspace(-1, 1, 5, dtype=torch.bfloat16)
    new = load_state_dict(net, dict(sd, **{"fc.bias": half}))
    np.testing.assert_array_equal(new["fc"].bias, half.double().numpy())
    assert new["fc"].bias.dtype == net["fc"].bias.dtype
    with pytest.raises(ValueError, match=r"layer 'conv1': state_dict\['conv1\.weight'\] contains 1 non-finite"):
        w = sd["conv1.weight"].clone()
        w[0, 0, 0, 0] = float("nan")
        load_state_dict(net, dict(sd, **{"conv1.weight": w.to(torch.bfloat16)}))
