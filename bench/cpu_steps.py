"""Train and eval steps on the CPU: jaxtl against PyTorch (NCHW and channels_last), and jaxtl's compile times.

For ResNet-18 and EfficientNet-B0 at 224: one training step at batch 32 for three freezing policies
(full fine-tuning, last block + head, head only) and eval (feature extraction) at batch 64. The
PyTorch step is the recipe's: ``model.train()``, ``requires_grad=False`` on frozen parameters, AdamW
over the trainable ones; the trainable set is jaxtl's, by name (jaxtl's parameter names are
torchvision's). jaxtl's step differentiates the trainable parameters only, with frozen BatchNorm in
eval mode (its head_only and last_n_blocks policies). Rounds alternate between the three sides after
a warm-up; the table gives median images per second and the ratios jaxtl / PyTorch.

Then the compile time of jaxtl's full train step in fresh processes (trace and lower, then XLA's
compile): with an empty persistent compilation cache, and again with the cache the first process
filled, where the compile is a read of the cached executable.

``--xla ynnpack`` runs jaxtl with XLA:CPU's dots in YNNPACK (jaxtl/xla.py, opt-in).

    python bench/cpu_steps.py [--archs resnet18,efficientnet_b0] [--steps 2] [--rounds 3] [--compile-only] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

POLICIES = {"full": "full", "last block + head": "last_n_blocks:1", "head only": "head_only"}


def jaxtl_step(arch: str, policy: str, batch: int, size: int):
    """jaxtl's jitted train step and its first arguments.

    Returns ``(step, (state, opt_state, images, labels, mask), trainable)``.
    """
    import jax.numpy as jnp
    import numpy as np

    import jaxtl.models
    from jaxtl.optim import OptimizerConfig, assign, build_optimizer, get_policy
    from jaxtl.train.step import make_train_step, split_model

    model = jaxtl.models.create(arch, num_classes=5)
    groups = assign(model, get_policy(policy)(model))
    trainable = sorted(groups.trainable_names)
    graphdef, state = split_model(model, groups)
    tx = build_optimizer(groups, OptimizerConfig(name="adamw", lr=1e-3, weight_decay=1e-4))
    opt_state = tx.init(state.trainable)
    step = make_train_step(graphdef, tx)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    labels, mask = jnp.asarray(rng.integers(0, 5, (batch,), dtype=np.int32)), jnp.ones((batch,), bool)
    return step, (state, opt_state, images, labels, mask), trainable


def jaxtl_side(arch: str, policy: str, batch: int, size: int):
    import jax

    step, (state, opt_state, images, labels, mask), trainable = jaxtl_step(arch, policy, batch, size)
    holder = {"state": state, "opt": opt_state, "i": 0}

    def run(steps: int) -> int:
        for _ in range(steps):
            holder["state"], holder["opt"], metrics = step(
                holder["state"], holder["opt"], images, labels, mask, holder["i"]
            )
            holder["i"] += 1
        jax.block_until_ready(metrics)
        return steps * batch

    return run, trainable


def torch_side(arch: str, trainable: list[str], batch: int, size: int, channels_last: bool):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=5)
    names = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad = name in names
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 5, (batch,))

    def run(steps: int) -> int:
        model.train()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps * batch

    return run


def eval_sides(arch: str, batch: int, size: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchvision

    import jaxtl.models
    from jaxtl.optim import assign, get_policy
    from jaxtl.train.step import make_eval_step, split_model

    model = jaxtl.models.create(arch, num_classes=5)
    graphdef, state = split_model(model, assign(model, get_policy("full")(model)))
    step = make_eval_step(graphdef)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    labels, mask = jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool)

    def run_jaxtl(steps: int) -> int:
        for _ in range(steps):
            logits, _ = step(state, images, labels, mask)
        jax.block_until_ready(logits)
        return steps * batch

    def torch_run(channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = torchvision.models.get_model(arch, num_classes=5).eval().to(memory_format=fmt)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)

        @torch.no_grad()
        def run(steps: int) -> int:
            for _ in range(steps):
                net(x)
            return steps * batch

        return run

    return {"jaxtl": run_jaxtl, "torch NCHW": torch_run(False), "torch channels_last": torch_run(True)}


def alternate(runs: dict, steps: int, rounds: int) -> dict[str, float]:
    for run in runs.values():
        run(1)  # warm-up: compile, allocator, oneDNN primitives
    times = {name: [] for name in runs}
    done = {}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            done[name] = run(steps)
            times[name].append(time.perf_counter() - start)
    return {name: done[name] / statistics.median(t) for name, t in times.items()}


def compile_time(arch: str, policy: str, batch: int, size: int) -> dict[str, float]:
    """Seconds to trace and lower the train step, and to compile it (or read it from the persistent
    cache), in a fresh process (run by ``--compile-probe``)."""
    step, args, _ = jaxtl_step(arch, policy, batch, size)
    start = time.perf_counter()
    lowered = step.trace(*args, 0).lower()
    traced = time.perf_counter()
    lowered.compile()
    return {"trace_lower": traced - start, "compile": time.perf_counter() - traced}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet18,efficientnet_b0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile-probe", help=argparse.SUPPRESS)  # ARCH:POLICY, internal
    parser.add_argument("--compile-only", action="store_true", help="only the compile times (of the first arch)")
    parser.add_argument("--no-compile", action="store_true", help="no compile times, only the steps")
    parser.add_argument("--cases", default=",".join([*POLICIES, "eval"]), help="a comma-separated subset of: "
                        + ", ".join([*POLICIES, "eval"]))  # fmt: skip
    parser.add_argument("--xla", choices=("default", "ynnpack"), default="default",
                        help="ynnpack: XLA:CPU's dots in YNNPACK (jaxtl/xla.py, opt-in); "
                        "default: XLA's own kernels")  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.xla == "ynnpack":
        from jaxtl.xla import use_ynnpack, ynnpack_supported

        if not ynnpack_supported():
            parser.error("--xla ynnpack: the flag was not tested with this jaxlib (see jaxtl/xla.py)")
        use_ynnpack()  # before jax is imported; the compile probes inherit it
    unknown = set(args.cases.split(",")) - {*POLICIES, "eval"}
    if unknown:
        parser.error(f"--cases: unknown {', '.join(sorted(unknown))}; the cases are {', '.join([*POLICIES, 'eval'])}")

    if args.compile_probe:
        arch, policy = args.compile_probe.split("@")
        print("compile_probe=" + json.dumps(compile_time(arch, policy, args.batch, args.size)))
        return 0

    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {args.batch} (eval {args.eval_batch}) at {args.size}; "
          f"{args.steps} steps x {args.rounds} rounds; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)  # fmt: skip
    rows = []
    for arch in [] if args.compile_only else args.archs.split(","):
        for label, policy in [*POLICIES.items(), ("eval", None)]:
            if label not in args.cases.split(","):
                continue
            if policy is None:
                runs = eval_sides(arch, args.eval_batch, args.size)
            else:
                jaxtl_run, trainable = jaxtl_side(arch, policy, args.batch, args.size)
                runs = {
                    "jaxtl": jaxtl_run,
                    "torch NCHW": torch_side(arch, trainable, args.batch, args.size, False),
                    "torch channels_last": torch_side(arch, trainable, args.batch, args.size, True),
                }
            rates = alternate(runs, args.steps, args.rounds)
            row = {"arch": arch, "case": label, **rates}
            rows.append(row)
            j, t, c = rates["jaxtl"], rates["torch NCHW"], rates["torch channels_last"]
            print(f"{arch + ' ' + label:<34} {j:8.2f} {t:8.2f} {c:9.2f} {j / t:6.2f}x {j / c:5.2f}x", flush=True)
        rate = {r["case"]: r["jaxtl"] for r in rows if r["arch"] == arch}
        if "full" in rate and "last block + head" in rate:
            print(f"{arch}: last block + head step time / full step time = "
                  f"{rate['full'] / rate['last block + head']:.3f}", flush=True)  # fmt: skip

    return _report(args, rows, {} if args.no_compile else compile_times(args))


def compile_times(args) -> dict[str, dict[str, float]]:
    """The first arch's full-step compile, cold and then with the cache the cold process filled."""
    compiles = {}
    arch = args.archs.split(",")[0]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        for run in ("cold", "warm"):
            out = subprocess.run(
                [sys.executable, __file__, "--compile-probe", f"{arch}@full", "--batch", str(args.batch),
                 "--size", str(args.size)],
                capture_output=True, text=True, env=env, check=True,
            ).stdout  # fmt: skip
            compiles[run] = json.loads(out.split("compile_probe=")[1].splitlines()[0])
    return compiles


def _report(args, rows: list[dict], compiles: dict) -> int:
    header = f"{'case':<34} {'jaxtl':>8} {'torch':>8} {'torch CL':>9} {'/torch':>7} {'/CL':>6}  img/s"
    print(f"\n{header}")
    for row in rows:
        j, t, c = row["jaxtl"], row["torch NCHW"], row["torch channels_last"]
        print(f"{row['arch'] + ' ' + row['case']:<34} {j:8.2f} {t:8.2f} {c:9.2f} {j / t:6.2f}x {j / c:5.2f}x")
    c, arch = compiles, args.archs.split(",")[0]
    if compiles:
        cold, warm = sum(c["cold"].values()), sum(c["warm"].values())
        print(f"{arch} full train step in a fresh process, trace + lower + compile: {cold:.1f} s with an empty "
              f"compilation cache ({c['cold']['trace_lower']:.1f} + {c['cold']['compile']:.1f}), {warm:.1f} s with "
              f"the cache filled ({c['warm']['trace_lower']:.1f} + {c['warm']['compile']:.1f}) "
              f"= {warm / cold:.0%}")  # fmt: skip
    write_json(args, "cpu_steps", images_per_second=rows, compile_seconds=compiles)
    return 0


def write_json(args: argparse.Namespace, benchmark: str, **results) -> None:
    """``results`` with the benchmark's name, the date and the settings, to ``args.json`` if it is set."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": benchmark,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            **results,
        }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
