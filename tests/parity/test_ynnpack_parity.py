"""The eval-mode programs a run compiles with YNNPACK's dots on the CPU (``train.ynnpack: eval``, the default)
compute what torchvision computes, within the numerics contract's eval bounds (convert/parity.py)."""

import jax
import numpy as np
import pytest
import torch

from convert.parity import compare
from convert.random_models import randomized_torchvision_model
from convert.torchvision_state import from_torchvision
from jaxtl.train.evaluate import eval_model_state
from jaxtl.train.step import make_eval_step, make_features_step
from jaxtl.xla import YNNPACK, program_options, ynnpack_supported


def test_program_options_cover_the_programs_the_setting_names():
    cpu = dict(YNNPACK) if ynnpack_supported() else {}
    assert program_options("eval", "eval", backend="cpu") == cpu
    assert program_options("eval", "train", backend="cpu") == {}
    assert program_options("all", "train", backend="cpu") == cpu
    assert program_options("off", "eval", backend="cpu") == {}
    assert program_options("all", "eval", backend="gpu") == {}
    assert program_options("eval", "eval", "bf16", backend="cpu") == {}  # in bf16, as the train steps
    assert program_options("all", "eval", "bf16", backend="cpu") == cpu
    with pytest.raises(ValueError, match="ynnpack='fast' is not one of eval, all, off"):
        program_options("fast", "eval")


@pytest.mark.skipif(jax.default_backend() != "cpu" or not ynnpack_supported(), reason="YNNPACK is XLA:CPU's")
@pytest.mark.parametrize(
    "arch, size", [("resnet18", (97, 131)), pytest.param("efficientnet_b0", (57, 71), marks=pytest.mark.slow)]
)
def test_eval_programs_with_ynnpack_match_torchvision(arch, size):
    torch_model = randomized_torchvision_model(arch, num_classes=10, seed=0).eval()
    graphdef, state = eval_model_state(from_torchvision(torch_model, arch))
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(1))
    pooled = []  # the pooled features: the input of both families' classifier
    torch_model.avgpool.register_forward_hook(lambda module, args, out: pooled.append(torch.flatten(out, 1)))
    with torch.no_grad():
        logits = torch_model(x).numpy()
    images = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))  # float32: the steps do not normalise it
    options = program_options("eval", "eval")
    assert options == YNNPACK
    eval_step = make_eval_step(graphdef, compiler_options=options)
    got_logits, _ = eval_step(state, images, np.zeros(4, np.int32), np.ones(4, bool))
    got_features = make_features_step(graphdef, compiler_options=options)(state, images)
    for name, expected, actual in (("logits", logits, got_logits), ("features", pooled[0].numpy(), got_features)):
        comparison = compare("eval logits", name, expected, np.asarray(actual))
        assert comparison.passed, comparison
