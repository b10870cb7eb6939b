import json
import os
import zipfile

import numpy as np
import pytest

import npconv
from npconv.io import from_torch, load_state_dict
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
    with pytest.raises(ValueError, match="weight contains 1 non-finite"):
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
