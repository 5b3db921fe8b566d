"""Progressive unfreezing two ways: phases (a compile per stage, no backward through frozen layers) against a
step-scheduled mask in one optimizer (one compile, every gradient computed from the first step).

Three stages, as the recipe's progressive unfreezing: the head, then the last stage with it, then everything,
with every BatchNorm frozen (``bn: frozen``) in both, on the same model, batch and optimizer (AdamW):

- phases: three train steps, one per stage (``head_only``, ``last_n_blocks:1``, ``full``), each compiled when
  its stage starts and differentiating only what trains;
- mask: one train step over everything, ``unfreeze_at`` holding the last stage and the rest at zero updates
  until their stage (:mod:`jaxtl.optim.scheduled_mask`).

It measures each step's first call (compile) and its median images per second, then adds up a schedule of
``--stage-steps`` steps per stage both ways and prints the ratio and the stage length at which they break even.
The head-only stage is measured through the frozen backbone, not on cached features (which a run uses when it
can, and which makes phases cheaper still).

    python bench/unfreezing.py [--arch resnet50] [--batch 16] [--size 128] [--stage-steps 100,100,100] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime

STAGES = ("head_only", "last_n_blocks:1", "full")


def steps(arch: str, batch: int, size: int, stage_steps: tuple[int, ...]) -> dict:
    """name -> (run one step); the phases' three and the mask's one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxtl.models
    from jaxtl.optim import OptimizerConfig, Phase, Rule, build_optimizer
    from jaxtl.train.step import make_train_step, split_model

    model = jaxtl.models.create(arch, num_classes=10)
    *_, (_, last) = list(model.blocks())[:-1]
    config = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    labels, mask = jnp.asarray(rng.integers(0, 10, (batch,), dtype=np.int32)), jnp.ones((batch,), bool)

    def runner(phase: Phase):
        groups = phase.groups(model)
        graphdef, state = split_model(model, groups)
        tx = build_optimizer(groups, config, total_steps=sum(stage_steps))
        step = make_train_step(graphdef, tx, num_classes=10)
        carry = {"state": jax.tree.map(jnp.copy, state), "opt": tx.init(state.trainable), "step": 0}

        def one():
            carry["state"], carry["opt"], metrics = step(
                carry["state"], carry["opt"], images, labels, mask, carry["step"]
            )
            carry["step"] += 1
            return metrics

        return one

    runs = {f"phase {policy}": runner(Phase(policy, policy, epochs=1, bn="frozen")) for policy in STAGES}
    head = f"{model.head_name}.*"
    rules = [Rule(head, group="head"), *(Rule(f"{p}*", group="blocks") for p in last), Rule("*", group="backbone")]
    starts = {"blocks": stage_steps[0], "backbone": stage_steps[0] + stage_steps[1]}
    runs["mask (one step)"] = runner(Phase("mask", rules=rules, epochs=1, bn="frozen", unfreeze_at=starts))
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--stage-steps", default="100,100,100", help="steps of the head, last-stage and full stages")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    stage_steps = tuple(int(n) for n in args.stage_steps.split(","))
    if len(stage_steps) != 3:
        parser.error("--stage-steps takes three numbers: head, last stage, full")

    import jax

    runs = steps(args.arch, args.batch, args.size, stage_steps)
    compile_s = {}
    for name, one in runs.items():  # the first call compiles; one more step before timing
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
            rates[name].append(args.steps / (time.perf_counter() - started))
    step_s = {name: 1 / statistics.median(values) for name, values in rates.items()}
    device = jax.devices()[0].device_kind
    print(f"{args.arch}, batch {args.batch} at {args.size}px, {device}, {args.rounds} rounds of {args.steps} steps")
    print(f"{'step':<26} {'s/step':>8} {'/full':>7} {'first call s':>13}")
    for name, seconds in step_s.items():
        print(f"{name:<26} {seconds:8.3f} {seconds / step_s['phase full']:6.3f}x {compile_s[name]:13.1f}")
    phases = sum(compile_s[f"phase {p}"] + n * step_s[f"phase {p}"] for p, n in zip(STAGES, stage_steps, strict=True))
    masked = compile_s["mask (one step)"] + sum(stage_steps) * step_s["mask (one step)"]
    # Equal stages of n steps: phases cost C_p + n * sum(t_i), the mask C_m + 3n * t_m; equal at n below.
    compiles = sum(compile_s[f"phase {p}"] for p in STAGES) - compile_s["mask (one step)"]
    saving = 3 * step_s["mask (one step)"] - sum(step_s[f"phase {p}"] for p in STAGES)
    even = compiles / saving if saving > 0 else float("inf")
    print(f"schedule {stage_steps}: phases {phases:.1f}s, mask {masked:.1f}s, mask / phases {masked / phases:.3f}")
    print(f"equal stages break even at {even:.1f} steps per stage (longer stages favour phases)")
    if args.json:
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(), "device": device,
            "args": vars(args), "step_s": step_s, "first_call_s": compile_s, "phases_s": phases, "mask_s": masked,
            "break_even_steps_per_stage": even,
        }  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
