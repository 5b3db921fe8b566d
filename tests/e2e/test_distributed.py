"""`jaxtl train` as a data-parallel run of two processes (jax.distributed over gloo on CPU), as on two hosts.

Each process has 2 CPU devices; the run must compute what one process with 4 devices computes, write
its run directory once (from the first process), and resume after both processes are killed.
"""

import json
import signal
import socket
import subprocess

import numpy as np
import pytest
from devices import host_devices_env
from test_train import CONFIGS, JAXTL, arrays, metrics, train
from tiny import TINY

from jaxtl.train.checkpoint import load_meta

PHASES = ("phases.0.epochs=1", "phases.1.epochs=1")  # head-only on cached features, then the last block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(run_dir, *extra, resume=False, fault=None, expect=(0, 0)):
    """Runs both processes of a 2-process run to their end; their (stdout, stderr).

    ``expect`` holds each process's allowed exit statuses (or one status).
    """
    port = free_port()
    env = host_devices_env(2)
    if fault:
        env["JAXTL_TEST_FAULT"] = fault
    if resume:
        args = ["train", "--resume", str(run_dir)]
    else:
        sets = [f"run_dir={run_dir}", *TINY, *PHASES, *extra]
        args = ["train", str(CONFIGS / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]
    processes = [
        subprocess.Popen(
            [*JAXTL, *args, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for i, (p, (out, err), allowed) in enumerate(zip(processes, outputs, expect)):
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        assert p.returncode in allowed, (
            f"process {i}: exit {p.returncode}, expected {allowed}\n{out[-3000:]}{err[-3000:]}"
        )
    return outputs


@pytest.mark.slow
def test_two_processes_compute_what_one_process_with_all_devices_computes(tmp_path):
    env = host_devices_env(4)
    one = train(tmp_path / "one", "quickstart.yaml", *PHASES, env=env)
    assert "on 4 device(s), 2 phase(s)" in one.stdout

    (first, _), (second, second_err) = two_processes(tmp_path / "two")
    assert "on 4 device(s) of 2 processes" in first and "done in" in first
    # The first process alone logs (the second's stdout holds only gloo's own connection lines).
    for line in ("run ", "phase 1/2", "epoch 1", "done in"):
        assert line in first and line not in second and line not in second_err, line
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")  # written once
    assert [r["epoch"] for r in b] == [1, 2]
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "train_acc1", "val_loss", "val_acc1"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), (key, x, y)
    # Parameters to a few AdamW steps (lr 1e-4 in the last block): gradients summed in another order
    # differ by float32 rounding, and Adam's m / sqrt(v) turns a near-zero gradient's rounding into
    # an update of up to lr (measured: 7e-5 at most).
    for name in ("latest", "best"):
        want, got = arrays(tmp_path / "one" / "checkpoints" / name), arrays(tmp_path / "two" / "checkpoints" / name)
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=3e-4, err_msg=f"{name}: {key}")
    assert json.loads((tmp_path / "two" / "confusion.json").read_text())["matrix"] == json.loads(
        (tmp_path / "one" / "confusion.json").read_text()
    )["matrix"]  # fmt: skip

    # Killed at the 8th step (inside the second phase): each process by the fault or, when the other
    # is gone before it gets there, by JAX (SIGABRT: a task of the run died). Then resumed as two processes.
    killed = (-signal.SIGKILL, -signal.SIGABRT)
    two_processes(tmp_path / "cut", fault="kill:train.step:8", expect=(killed, killed))
    assert load_meta(tmp_path / "cut" / "checkpoints" / "latest")["step"] == 5  # the first phase's end
    (resumed, _), _ = two_processes(tmp_path / "cut", resume=True)
    assert "resumed from" in resumed
    want, got = arrays(tmp_path / "two" / "checkpoints" / "latest"), arrays(tmp_path / "cut" / "checkpoints" / "latest")
    for key in want:
        assert np.array_equal(got[key], want[key]), key


def test_process_arguments_go_together(tmp_path):
    result = subprocess.run(
        [*JAXTL, "train", str(CONFIGS / "quickstart.yaml"), "--num-processes", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--coordinator, --num-processes and --process-id go together" in result.stderr
