"""Pre-AD remat (graphopt.remat) of layers under lax.scan: the scan body is checkpointed."""
import functools

import jax
import jax.numpy as jnp
import pytest

import graphopt
from graphopt import ir
from graphopt.models import gpt
from graphopt.testing import assert_equivalent
from graphopt.transforms.remat import pre_ad as remat_pre

K = jax.random.PRNGKey(0)
SIZES = dict(n_layers=3, d_model=32, n_heads=2, seq_len=32, vocab=64, batch=4)


@pytest.fixture(scope="module")
def scanned():
    p = gpt.init(K, **SIZES, scan_layers=True)
    b = gpt.example_batch(K, batch=4, seq_len=32, vocab=64)
    return functools.partial(gpt.loss, scan_layers=True), p, b


def _scan_bodies(cj):
    return [e.params["jaxpr"].jaxpr for e in cj.jaxpr.eqns if e.primitive.name == "scan"]


@pytest.mark.slow  # minutes of compiles: the full leg only (CI leg 1)
def test_scan_body_checkpointed_within_budget(scanned):
    loss, p, b = scanned
    r = graphopt.remat(loss, memory_budget=0.3)
    info = r.info(p, b)
    assert info["solver"].startswith("scan-checkpoint"), info["stats"].notes
    assert info["bytes"] <= info["budget_bytes"] * 1.05 < info["base_bytes"]
    assert info["flops"] > 0
    bodies = _scan_bodies(r.jaxpr(p, b))
    assert bodies and all(any(ir.is_checkpoint(e) for e in body.eqns)
                          for body in bodies)
    assert_equivalent(jax.value_and_grad(loss), jax.value_and_grad(r), p, b)
    levels = info["scan_levels"]   # each level tried recomputes more and keeps less
    assert [n for n, _, _ in levels] == [n for n, _ in remat_pre.SCAN_LEVELS][:len(levels)]
    assert levels[-1][1] < levels[0][1] and levels[0][2] < levels[-1][2]


def test_user_checkpointed_scan_left_alone():
    def f(w, x):
        body = jax.checkpoint(lambda c, _: (jnp.tanh(c @ w), None))
        return jnp.sum(jax.lax.scan(body, x, None, length=4)[0])
    w, x = jnp.eye(8) * 0.5, jnp.ones((2, 8))
    cj = jax.make_jaxpr(f)(w, x)
    assert remat_pre.checkpoint_scans(cj, "nothing_saveable")[2] == 0
