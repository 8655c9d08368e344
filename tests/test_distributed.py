"""Multi-process data parallelism: two processes joined by ``jax.distributed`` (CPU
collectives on 127.0.0.1) run ``graphopt.optimize`` of the zoo GPT training step on global
arrays and get what one process gets from ``jax.jit`` of the unoptimized step."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jax

from graphopt.models import gpt

WORKER = Path(__file__).with_name("distributed_worker.py")
N_PROC, STEPS, BATCH, SEED = 2, 3, 8, 0
NO_COLLECTIVES = 77                       # the worker's status when JAX has no CPU collectives
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _start_workers(tmp_path: Path, inputs: Path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = []
    for pid in range(N_PROC):
        log = tmp_path / f"worker{pid}.log"
        cmd = [sys.executable, str(WORKER), str(pid), str(N_PROC), str(port), str(inputs),
               str(tmp_path / f"out{pid}.npz"), str(STEPS)]
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))
    return procs


def _kill(procs) -> None:
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _wait(procs):
    """Wait for both; one that fails stops the other at once (it would wait for its peer)."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p, _ in procs):
        failed = any(p.returncode not in (None, 0) for p, _ in procs)
        if failed or time.monotonic() > deadline:
            _kill(procs)
            if not failed:
                pytest.fail(f"the workers did not finish in {TIMEOUT_S} s:\n" + _logs(procs))
            break
        time.sleep(0.2)
    codes = [p.returncode for p, _ in procs]
    if NO_COLLECTIVES in codes:
        pytest.skip("this JAX has no cross-process CPU collectives (gloo): " + _logs(procs))
    if any(codes):
        pytest.fail(f"worker exit statuses {codes}:\n" + _logs(procs))


def _logs(procs) -> str:
    return "\n".join(f"--- process {i} (last lines) ---\n{_tail(log)}"
                     for i, (_, log) in enumerate(procs))


def _inputs():
    k_init, k_batch = jax.random.split(jax.random.PRNGKey(SEED))
    opt = gpt.optimizer()
    params = gpt.init(k_init)
    return opt, params, opt.init(params), gpt.example_batch(k_batch, batch=BATCH)


def _save_inputs(path: Path, params, opt_state, batch) -> None:
    """The starting values as flat leaves, which the workers load (see distributed_worker.py)."""
    np.savez(path, inputs=np.asarray(batch[0]), targets=np.asarray(batch[1]),
             **{f"param{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))},
             **{f"opt{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))})


def _single_process_steps(opt, params, opt_state, batch):
    """The same steps in this process: jax.jit of the unoptimized step on the whole batch."""
    step = jax.jit(gpt.make_train_step(opt))
    losses = []
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
    return np.asarray(losses), [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow  # three processes compile a step: leg 1 only (.ci/run)
def test_two_processes_match_single_process(tmp_path):
    opt, params0, opt_state0, batch = _inputs()
    _save_inputs(tmp_path / "inputs.npz", params0, opt_state0, batch)
    procs = _start_workers(tmp_path, tmp_path / "inputs.npz")
    try:  # the reference is computed while the workers run
        losses, params = _single_process_steps(opt, params0, opt_state0, batch)
    except BaseException:
        _kill(procs)
        raise
    _wait(procs)
    outs = [np.load(tmp_path / f"out{pid}.npz") for pid in range(N_PROC)]
    for pid, out in enumerate(outs):
        # a real two-process run over both processes' devices, one device each
        assert (int(out["process_count"]), int(out["device_count"]),
                int(out["local_device_count"])) == (N_PROC, N_PROC, 1), pid
        # the program that ran is graphopt's rewrite, not the step as traced
        assert int(out["eqns_after"]) < int(out["eqns_before"]), pid
        assert {"dce", "cse"} <= set(out["changed"].tolist()), out["changed"]
        np.testing.assert_allclose(out["losses"], losses, rtol=1e-5, err_msg=f"process {pid}")
        assert int(out["n_params"]) == len(params)
        for i, ref in enumerate(params):
            np.testing.assert_allclose(out[f"p{i}"], ref, rtol=1e-5, atol=1e-7,
                                       err_msg=f"process {pid}, parameter leaf {i}")
    # both processes hold the same (replicated) result, bit for bit
    np.testing.assert_array_equal(outs[0]["losses"], outs[1]["losses"])
    for i in range(len(params)):
        np.testing.assert_array_equal(outs[0][f"p{i}"], outs[1][f"p{i}"])
    # the losses moved: three real training steps, not one repeated
    assert losses[-1] < losses[0]
