"""train.bn_sync false: BatchNorm statistics per device, as PyTorch's DistributedDataParallel computes them.

The reference is DDP's arithmetic on 8 replicas, written out in one process: before each forward pass every
replica gets rank 0's buffers (DDP's broadcast_buffers), each normalises its own rows with their statistics
and takes its mean loss, the gradients are averaged (DDP's all-reduce), every replica takes the same step.
jaxtl computes it with the batch split into 8 BatchNorm groups: on one device here, and on 8 CPU devices
with the batch sharded over them in a second process (the groups are then the devices' rows).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from devices import host_devices_env

REPLICAS, ROWS, SIZE, STEPS = 8, 2, 64, 2


def ddp_reference(torch_model, batches):
    """rank 0's model after DDP steps (SGD, momentum 0.9) on ``batches``, each split over the replicas."""
    import torch
    import torch.nn.functional as F

    replicas = [copy.deepcopy(torch_model).train() for _ in range(REPLICAS)]
    optimizer = torch.optim.SGD(replicas[0].parameters(), lr=0.05, momentum=0.9)
    for x, y in batches:
        buffers = {name: b.clone() for name, b in replicas[0].named_buffers()}
        grads = None
        for rank, replica in enumerate(replicas):
            replica.load_state_dict({**replica.state_dict(), **buffers})  # broadcast_buffers: rank 0's
            replica.load_state_dict({**replica.state_dict(), **dict(replicas[0].named_parameters())})
            replica.zero_grad()
            rows = slice(rank * ROWS, (rank + 1) * ROWS)
            loss = F.cross_entropy(replica(x[rows]), y[rows])
            loss.backward()
            local = [p.grad.clone() for p in replica.parameters()]
            grads = local if grads is None else [g + h for g, h in zip(grads, local)]
            if rank == 0:
                rank0_buffers = {name: b.clone() for name, b in replica.named_buffers()}
        optimizer.zero_grad()
        for p, g in zip(replicas[0].parameters(), grads):
            p.grad = g / REPLICAS  # the all-reduce's mean
        replicas[0].load_state_dict({**replicas[0].state_dict(), **rank0_buffers})
        optimizer.step()
    return replicas[0]


def jaxtl_steps(jax_model, batches, groups: int, shard: bool):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxtl.data import data_sharding
    from jaxtl.models.state_dict import state_dict
    from jaxtl.optim import OptimizerConfig, Rule, assign, build_optimizer
    from jaxtl.train.step import make_train_step, split_model

    groups_ = assign(jax_model, [Rule("*", group="all", bn="train")])
    graphdef, state = split_model(jax_model, groups_)
    optimizer = build_optimizer(groups_, OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.0))
    step = make_train_step(graphdef, optimizer, donate=False, bn_groups=groups)
    opt_state = optimizer.init(state.trainable)
    sharding = data_sharding(REPLICAS * ROWS) if shard else None
    for index, (x, y) in enumerate(batches):
        images, labels = jnp.asarray(x.permute(0, 2, 3, 1).numpy()), jnp.asarray(y.numpy())
        mask = jnp.ones(len(y), bool)
        if sharding is not None:
            images, labels, mask = (jax.device_put(a, sharding) for a in (images, labels, mask))
        state, opt_state, _ = step(state, opt_state, images, labels, mask, index)
    return state_dict(nnx.merge(graphdef, *jax.device_get(state)))


def setup():
    import torch

    from convert.train_parity import create_training_pair, disable_dropout

    torch_model, jax_model = create_training_pair("resnet18", num_classes=5, seed=4)
    disable_dropout(torch_model, jax_model)
    generator = torch.Generator().manual_seed(2)
    n = REPLICAS * ROWS
    batches = [
        (torch.randn(n, 3, SIZE, SIZE, generator=generator), torch.randint(0, 5, (n,), generator=generator))
        for _ in range(STEPS)
    ]
    return torch_model, jax_model, batches


def worst_difference(torch_model, ours) -> dict[str, float]:
    """Per key, the largest |ours - torch| relative to the largest |torch| of that tensor."""
    from convert.torchvision_state import from_torchvision
    from jaxtl.models.state_dict import state_dict

    expected = state_dict(from_torchvision(torch_model, "resnet18"))
    return {k: float(np.max(np.abs(ours[k] - v)) / max(float(np.max(np.abs(v))), 1e-12)) for k, v in expected.items()}


@pytest.fixture(scope="module")
def reference():
    torch_model, jax_model, batches = setup()
    return ddp_reference(torch_model, batches), jax_model, batches


@pytest.mark.slow
def test_per_device_statistics_equal_ddps_on_eight_replicas(reference):
    rank0, jax_model, batches = reference
    ours = jaxtl_steps(jax_model, batches, REPLICAS, shard=False)
    worst = worst_difference(rank0, ours)
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    synced = jaxtl_steps(jax_model, batches, 1, shard=False)  # SyncBatchNorm's statistics compute something else
    assert max(worst_difference(rank0, synced).values()) > 1e-3


@pytest.mark.slow
def test_on_eight_cpu_devices_each_device_normalises_its_own_rows(reference, tmp_path):
    """The batch sharded over 8 devices with bn_groups=8 (a second process: the device count is fixed at start)."""
    rank0, _, _ = reference
    out = tmp_path / "ours.npz"
    env = host_devices_env(8, JAX_PLATFORMS="cpu")
    code = (
        "import sys, numpy as np, jax; sys.path[:0] = sys.argv[2:]; import test_bn_sync as t; "
        "assert jax.device_count() == 8; _, m, b = t.setup(); "
        "np.savez(sys.argv[1], **t.jaxtl_steps(m, b, 8, shard=True))"
    )
    root = Path(__file__).parents[2]
    paths = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # the test module and tests/ (its helpers)
    result = subprocess.run([sys.executable, "-c", code, str(out), *paths], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ours = dict(np.load(out))
    worst = worst_difference(rank0, ours)
    assert max(worst.values()) < 1e-4, json.dumps(sorted(worst.items(), key=lambda kv: -kv[1])[:5])
