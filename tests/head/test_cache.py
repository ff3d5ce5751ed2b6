"""finereg.head._cache: keys that change with the model, the data and the options; atomic entries."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finereg.head._cache import cached, loader_fingerprint, make_key, module_fingerprint


def test_module_fingerprint_follows_state_and_class():
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(a) == module_fingerprint(b) == module_fingerprint(nn.DataParallel(a))
    with torch.no_grad():
        b.bias[0] += 1e-7
    assert module_fingerprint(a) != module_fingerprint(b)
    assert module_fingerprint(a) != module_fingerprint(a.double())  # dtype is part of the key


def test_loader_fingerprint_follows_data_and_order():
    x, y = torch.randn(10, 3), torch.arange(10)
    fp = lambda ds: loader_fingerprint(DataLoader(ds, batch_size=4))
    assert fp(TensorDataset(x, y)) == fp(TensorDataset(x.clone(), y.clone()))
    assert fp(TensorDataset(x, y)) != fp(TensorDataset(x.flip(0), y.flip(0)))
    assert fp(TensorDataset(x, y)) != loader_fingerprint(DataLoader(TensorDataset(x, y), batch_size=5))


def test_make_key_and_cached(tmp_path):
    assert make_key("a", 1, {"b": 2}) == make_key("a", 1, {"b": 2}) != make_key("a", 1, {"b": 3})
    calls = []

    def compute():
        calls.append(1)
        return {"t": torch.arange(3)}

    first = cached(tmp_path, "stem", "k1", compute)
    again = cached(tmp_path, "stem", "k1", compute)
    assert torch.equal(first["t"], again["t"]) and len(calls) == 1
    cached(tmp_path, "stem", "k2", compute)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stem-k1.pt", "stem-k2.pt"]  # no temporary files
    assert cached(None, "stem", "k1", compute) and len(calls) == 3  # no cache dir: always computed
