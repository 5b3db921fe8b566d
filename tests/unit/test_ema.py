"""train.ema against its references: torchvision's reference ExponentialMovingAverage (an AveragedModel over
parameters and buffers) and timm's ModelEmaV3 warmup, over 20 training steps of a ResNet-18."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from convert.torchvision_state import from_torchvision
from convert.train_parity import create_training_pair
from jaxtl.models.names import key_path_name
from jaxtl.train import ema

STEPS = 20


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """torchvision's references/classification/utils.py ExponentialMovingAverage (0.29), as it is written there."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, device, ema_avg, use_buffers=True)


def _saved(torch_model: torch.nn.Module) -> nnx.State:
    return nnx.state(from_torchvision(torch_model, "resnet18"), nnx.Any(nnx.Param, nnx.BatchStat))


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {key_path_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def _trajectory(update_reference, update_ours, every: int):
    """20 SGD steps of a ResNet-18 in train mode; after steps 0, every, 2 * every, ... both averages update."""
    torch_model, _ = create_training_pair("resnet18", num_classes=5, seed=2)
    torch_model.train()
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    ours = _saved(torch_model)
    for i in range(STEPS):
        x, y = torch.randn(4, 3, 64, 64, generator=generator), torch.randint(0, 5, (4,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(torch_model(x), y).backward()
        optimizer.step()
        if i % every == 0:  # torchvision's reference: `if i % args.model_ema_steps == 0`
            update_reference(torch_model, i)
            ours = update_ours(ours, _saved(torch_model), i)
    return torch_model, ours


def _assert_close(ours: nnx.State, reference: torch.nn.Module, model: torch.nn.Module):
    expected, actual, trained = _flat(_saved(reference)), _flat(ours), _flat(_saved(model))
    assert expected.keys() == actual.keys()
    moved = 0
    for name, value in actual.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7, err_msg=name)
        moved += not np.allclose(value, trained[name], rtol=1e-3)
    assert moved > len(actual) // 2  # an average, not the model's last weights


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 3])
def test_the_average_equals_torchvisions_reference_over_parameters_and_batchnorm_statistics(every):
    decay = 0.9  # visible in 20 steps (0.9998 would barely move)
    holder = {}

    def update_reference(model, i):
        if "ema" not in holder:
            holder["ema"] = ExponentialMovingAverage(copy.deepcopy(model), decay)  # a copy of the model as it is
        holder["ema"].update_parameters(model)

    def update_ours(average, state, i):
        return ema.update(average, state, ema.decay_at(i // every, decay, warmup=False))

    model, ours = _trajectory(update_reference, update_ours, every)
    _assert_close(ours, holder["ema"].module, model)


@pytest.mark.slow
def test_warmup_equals_timms_model_ema_v3():
    from timm.utils import ModelEmaV3

    holder = {}

    def update_reference(model, i):
        if "ema" not in holder:
            holder["ema"] = ModelEmaV3(model, decay=0.99, use_warmup=True)
        holder["ema"].update(model, step=i + 1)  # timm's train.py: the count of optimizer updates so far

    def update_ours(average, state, i):
        return ema.update(average, state, ema.decay_at(i, 0.99, warmup=True))

    model, ours = _trajectory(update_reference, update_ours, 1)
    _assert_close(ours, holder["ema"].module, model)


def test_decays_of_the_first_updates():
    assert ema.decay_at(0, 0.9998, warmup=False) == 0.0  # a copy, as AveragedModel's first update
    assert ema.decay_at(1, 0.9998, warmup=False) == 0.9998
    assert ema.decay_at(1, 0.9998, warmup=True) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay_at(10**9, 0.9998, warmup=True) == 0.9998
