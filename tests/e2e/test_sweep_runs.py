"""`jaxtl sweep` end to end on generated data: the same sweep in another directory gives the same numbers, and a
sweep SIGKILLed in the middle of a run, then started again, ends with them too without running a finished run
again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import TINY

JAXTL = [sys.executable, "-m", "jaxtl.cli"]
QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
POLICIES = "head_only,lp_ft,last_n_blocks:1"
# Mid-epoch checkpoints (TINY: 5 steps an epoch), so that an interrupted run has one to resume from.
SETS = [*TINY, "train.checkpoint_every_steps=2"]
# What a run computes, as opposed to how long it took.
NUMBERS = ("best_val_acc1", "best_val_loss", "best_epoch", "epochs", "steps", "trainable_params", "flops_per_step")


def sweep_command(out: Path) -> list[str]:
    command = [*JAXTL, "sweep", str(QUICKSTART), "--policies", POLICIES, "--seeds", "2", "--epochs", "1"]
    return command + ["--out", str(out), *[a for s in SETS for a in ("--set", s)]]


def numbers(out: Path) -> dict:
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    return {(r["policy"], r["seed"]): {key: r[key] for key in NUMBERS} for r in runs}


def kill_inside(run_dir: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    """SIGKILLs the sweep once ``run_dir`` has a checkpoint after step 2 and no result yet."""
    latest = run_dir / "checkpoints" / "latest" / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep finished before it could be interrupted"
    assert not (run_dir / "sweep-result.json").exists()


@pytest.mark.slow
def test_a_sweep_gives_the_same_numbers_again_and_after_a_kill(tmp_path):
    first = tmp_path / "first"
    done = subprocess.run(sweep_command(first), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("policy "))
    assert [line.split()[0] for line in table[header + 1 : header + 4]] == ["head_only", "lp_ft", "last_n_blocks:1"]
    assert f"the plot: {first / 'sweep.png'}" in done.stdout
    expected = numbers(first)
    assert set(expected) == {(p, s) for p in POLICIES.split(",") for s in (0, 1)}
    fc = 512 * 3 + 3
    for seed in (0, 1):
        head, lp_ft, block = (expected[p, seed] for p in POLICIES.split(","))
        assert (head["trainable_params"], lp_ft["trainable_params"]) == (fc, 11_176_512 + fc)
        assert block["trainable_params"] == 8_393_728 + fc
        # The head on cached features costs next to nothing; layer4's backward about half of the whole one's.
        assert head["flops_per_step"] < 1e-4 * block["flops_per_step"]
        assert 0.3 * lp_ft["flops_per_step"] < block["flops_per_step"] < 0.7 * lp_ft["flops_per_step"]
        assert (head["steps"], lp_ft["steps"], lp_ft["epochs"]) == (5, 5, 2)  # LP-FT's probe epoch takes no step
    assert (first / "head_only" / "seed1" / "checkpoints" / "best").is_dir()  # normal run directories
    assert (first / "lp_ft" / "seed0" / "report.html").is_file()
    assert (first / "sweep.csv").read_text().splitlines()[0].startswith("policy,seeds,val_acc1_mean,val_acc1_std")
    # The features of a random init (one per seed) are computed by head_only and read by lp_ft's probe.
    assert len(list((first / "features").glob("*.npz"))) == 2 and done.stdout.count("features read from") == 2

    # The same sweep, killed inside LP-FT's first run (both head_only runs finished), then started again.
    second = tmp_path / "second"
    process = subprocess.Popen(sweep_command(second), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_inside(second / "lp_ft" / "seed0", process)
    names = ("sweep-result.json", "metrics.jsonl")
    finished = [second / "head_only" / f"seed{seed}" / name for seed in (0, 1) for name in names]
    stamps = [path.stat().st_mtime_ns for path in finished]
    continued = subprocess.run(sweep_command(second), capture_output=True, text=True, timeout=900)
    assert continued.returncode == 0, continued.stdout[-3000:] + continued.stderr[-3000:]
    out = continued.stdout
    assert out.count("finished before") == 2 and "sweep: head_only seed 1 finished before" in out
    assert f"sweep: lp_ft seed 0: resuming {second / 'lp_ft' / 'seed0'}" in out
    assert f"resumed from {second / 'lp_ft' / 'seed0' / 'checkpoints' / 'latest'}" in out
    assert f"sweep: lp_ft seed 1: starting {second / 'lp_ft' / 'seed1'}" in out
    assert [path.stat().st_mtime_ns for path in finished] == stamps  # not run again
    assert numbers(second) == expected
    table_rows = [line.split()[:5] for line in table[header + 1 : header + 4]]  # policy .. accuracy ± spread
    again = continued.stdout.splitlines()
    start = next(i for i, line in enumerate(again) if line.startswith("policy "))
    assert [line.split()[:5] for line in again[start + 1 : start + 4]] == table_rows
    assert os.path.getsize(second / "sweep.png") > 10_000
