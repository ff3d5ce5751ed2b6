"""finereg.reparam._parametrize: each module owns its parametrized class, the fast getter, and reparametrizing a
DistributedDataParallel-wrapped model is refused up front with the fix."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from finereg._checks import FineregError
from finereg.reparam import batchnorm_to_groupnorm, freeze, standardize, unfreeze
from finereg.reparam._parametrize import install_fast_getter, own_class, refuse_ddp


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_own_class_separates_a_deep_copy():
    a = nn.Linear(3, 2)
    parametrize.register_parametrization(a, "weight", Double())
    b = copy.deepcopy(a)
    assert type(a) is type(b)  # what parametrize leaves: one class for both
    own_class(b)
    assert type(a) is not type(b) and type(b).__name__ == type(a).__name__ and isinstance(b, nn.Linear)
    parametrize.remove_parametrizations(b, "weight")
    torch.testing.assert_close(a.weight, 2 * a.parametrizations.weight.original)  # a still parametrized
    plain = nn.Linear(2, 2)
    own_class(plain)
    assert type(plain) is nn.Linear  # nothing to separate


def test_fast_getter_gives_the_same_weight():
    lin = nn.Linear(3, 2)
    parametrize.register_parametrization(lin, "weight", Double())
    own_class(lin)
    install_fast_getter(lin, "weight")
    torch.testing.assert_close(lin.weight, 2 * lin.parametrizations.weight.original)
    with parametrize.cached():  # parametrize's own path inside cached()
        torch.testing.assert_close(lin.weight, 2 * lin.parametrizations.weight.original)
    parametrize.register_parametrization(lin, "weight", Double())  # a chain of two: the slow path
    torch.testing.assert_close(lin.weight, 4 * lin.parametrizations.weight.original)


@pytest.fixture
def ddp_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_models_are_refused_with_the_fix(ddp_group):
    """issue 9 #13: reparametrizing after DistributedDataParallel failed later with a misleading DDP error."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    wrapped = nn.parallel.DistributedDataParallel(model)
    calls = {
        "freeze": lambda m: freeze(m, "module.0.weight", [0]),
        "unfreeze": lambda m: unfreeze(m, "module.0.weight"),
        "standardize": lambda m: standardize(m),
        "batchnorm_to_groupnorm": lambda m: batchnorm_to_groupnorm(m, num_groups=2),
    }
    for what, call in calls.items():
        with pytest.raises(FineregError, match=f"{what} cannot change a model already wrapped in Distributed"):
            call(wrapped)
    with pytest.raises(FineregError, match="reparametrize before wrapping"):
        refuse_ddp(torch.compile(wrapped, backend="eager"), "freeze")
    assert not parametrize.is_parametrized(model) and isinstance(model[1], nn.BatchNorm2d)  # nothing changed
    refuse_ddp(nn.DataParallel(model), "freeze")  # other wrappers pass
