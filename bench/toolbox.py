"""The fine-tuning toolbox's cost per step: the plain train step against the step with everything on.

Both in one run, on the same model, batch and optimizer (AdamW, warmup + cosine, full fine-tuning):

- plain: cross-entropy, nothing else;
- toolbox: Mixup 0.2 / CutMix 1.0 in the step (one of the two per batch), label smoothing 0.1, and the weight
  average (EMA) updated after every step, as configs/resnet50_timm_finetune.yaml trains;
- toolbox + TrivialAugmentWide: the same with the device augmentation of the batch before the step (the
  policy the timm-style config draws per image; a separate program, not part of the step);
- accumulate 2: the toolbox step with the batch in two micro-batches (memory for time, not part of the target).

Rounds alternate between the variants after a warm-up; the table gives median images per second and the ratio
to plain (the toolbox's target: at least 0.9, within 10% of the plain step).

    python bench/toolbox.py [--arch resnet50] [--batch 16] [--size 128] [--steps 3] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime


def variants(arch: str, batch: int, size: int) -> dict:
    """name -> (run one step, the images/labels it consumes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxtl.models
    from jaxtl.data.augment.mixing import Mixing
    from jaxtl.data.augment.pipeline import DeviceAugment, make_device_augment
    from jaxtl.optim import OptimizerConfig, assign, build_optimizer, get_policy
    from jaxtl.train import ema
    from jaxtl.train.losses import cross_entropy
    from jaxtl.train.step import make_train_step, split_model

    model = jaxtl.models.create(arch, num_classes=10)
    groups = assign(model, get_policy("full:0.1")(model))
    graphdef, state = split_model(model, groups)
    config = OptimizerConfig(name="adamw", lr=5e-4, weight_decay=0.05, schedule="warmup_cosine", warmup_steps=20)
    tx = build_optimizer(groups, config, total_steps=1000)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    labels, mask = jnp.asarray(rng.integers(0, 10, (batch,), dtype=np.int32)), jnp.ones((batch,), bool)
    indices = jnp.arange(batch, dtype=jnp.int32)
    mixing = Mixing(mixup_alpha=0.2, cutmix_alpha=1.0)
    augment = make_device_augment(DeviceAugment(policy="trivialaugment"), seed=0)

    def runner(*, toolbox: bool, accumulate: int = 1, trivialaugment: bool = False):
        step = make_train_step(
            graphdef, tx, loss_fn=cross_entropy(0.1 if toolbox else 0.0), mixing=mixing if toolbox else None,
            num_classes=10, accumulate_steps=accumulate,
        )  # fmt: skip
        carry = {"state": jax.tree.map(jnp.copy, state), "opt": tx.init(state.trainable), "step": 0}
        carry["ema"] = jax.tree.map(jnp.copy, state) if toolbox else None

        def one():
            inputs = augment(images, indices, carry["step"]) if trivialaugment else images
            carry["state"], carry["opt"], metrics = step(
                carry["state"], carry["opt"], inputs, labels, mask, carry["step"]
            )
            if carry["ema"] is not None:
                carry["ema"] = ema.update(carry["ema"], carry["state"], ema.decay_at(carry["step"], 0.9998, True))
            carry["step"] += 1
            return metrics

        return one

    return {
        "plain": runner(toolbox=False),
        "toolbox": runner(toolbox=True),
        "toolbox + TrivialAugmentWide": runner(toolbox=True, trivialaugment=True),
        "toolbox, accumulate 2": runner(toolbox=True, accumulate=2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import jax

    runs = variants(args.arch, args.batch, args.size)
    compile_s = {}
    for name, one in runs.items():  # warm-up: compile, then one more step
        started = time.perf_counter()
        jax.block_until_ready(one())
        compile_s[name] = time.perf_counter() - started
        jax.block_until_ready(one())
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, one in runs.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                out = one()
            jax.block_until_ready(out)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - started))
    median = {name: statistics.median(values) for name, values in rates.items()}
    device = jax.devices()[0].device_kind
    print(f"{args.arch}, batch {args.batch} at {args.size}px, {device}, {args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':<32} {'img/s':>9} {'/plain':>7} {'first step s':>13}")
    for name, rate in median.items():
        print(f"{name:<32} {rate:9.2f} {rate / median['plain']:6.3f}x {compile_s[name]:13.1f}")
    ratio = median["toolbox"] / median["plain"]
    print(f"toolbox step / plain step throughput: {ratio:.3f} (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    if args.json:
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(), "device": device,
            "args": vars(args), "median_images_per_s": median, "rates": rates, "first_step_s": compile_s,
            "toolbox_over_plain": ratio,
        }  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
