"""Shardings kept: every pass leaves sharding constraints and a jit's in/out shardings
and donation in place (the pattern engine no longer inlines such a jit), on a one-device
mesh here; on 8 host devices (a process of its own, tests/sharded_steps.py) the zoo GPT
step data- and tensor-parallel through the pipeline, per-device remat budgets, shard_map
and the errors for bad placements."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import graphopt
from graphopt import ir, patterns

MESH = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                     devices=jax.devices()[:1])
DP = NamedSharding(MESH, P("data"))
INNER = jax.jit(lambda h, w: jnp.tanh(h @ w) * 1.0,  # "* 1.0": simplify fires inside
                out_shardings=NamedSharding(MESH, P("data", "model")))


def f(w1, w2, x):
    x = jax.lax.with_sharding_constraint(x, DP)
    h = INNER(x, w1)
    y = jax.lax.with_sharding_constraint(h @ w2, DP)
    return jnp.mean(y ** 2)


def step(w1, w2, x):
    loss, (g1, g2) = jax.value_and_grad(f, argnums=(0, 1))(w1, w2, x)
    return loss, w1 - 0.1 * g1, w2 - 0.1 * g2


rng = np.random.default_rng(0)
ARGS = (jnp.asarray(rng.standard_normal((16, 32)), jnp.float32),
        jnp.asarray(rng.standard_normal((32, 8)), jnp.float32),
        jnp.asarray(rng.standard_normal((8, 16)), jnp.float32))


def placements(cj) -> list:
    """Every sharding constraint's spec and every jit's out shardings, nested included."""
    out = []
    for e, _, _ in ir.walk_eqns(cj):
        if e.primitive.name == "sharding_constraint":
            out.append(("constraint", str(e.params["sharding"].spec)))
        if ir.pins_placement(e):
            out.append(("jit", tuple(str(s.spec) for s in e.params["out_shardings"]
                                     if hasattr(s, "spec"))))
    return sorted(set(out))


def test_pattern_engine_keeps_a_sharded_jit_and_rewrites_inside_it():
    cj = jax.make_jaxpr(f)(*ARGS)
    flat, changed = patterns.inline_jits(cj)
    assert not changed and flat is cj  # inlining would drop out_shardings
    plain = jax.make_jaxpr(lambda x, w: jax.jit(lambda h, v: h @ v)(x, w))(ARGS[2], ARGS[0])
    assert patterns.inline_jits(plain)[1]  # a jit that pins nothing is still inlined
    o = graphopt.optimize(f, passes=["simplify"])
    body = next(e for e, _, _ in ir.walk_eqns(o.jaxpr(*ARGS)) if ir.pins_placement(e))
    assert "mul" not in ir.primitive_counts(body.params["jaxpr"])  # "* 1.0" gone inside
    np.testing.assert_allclose(o(*ARGS), jax.jit(f)(*ARGS), rtol=1e-6)


@pytest.mark.parametrize("fn", [f, step], ids=["forward", "step"])
@pytest.mark.parametrize("passes,options", [
    (None, {}), (["prune"], {}), (["fuse_matmul_chain", "fuse_parallel_dots"], {}),
    (["precision"], {"precision": "bfloat16"}), (["batch_parallel"], {"batch_parallel": "force"}),
], ids=["default", "prune", "fusions", "precision", "batch_parallel"])
def test_every_pass_keeps_shardings(fn, passes, options):
    before = placements(jax.make_jaxpr(fn)(*ARGS))
    assert before  # the test has something to lose
    o = graphopt.optimize(fn, passes=passes, **options)
    assert placements(o.jaxpr(*ARGS)) == before
    tol = 5e-2 if options.get("precision") else 1e-5
    for a, b in zip(jax.tree.leaves(o(*ARGS)), jax.tree.leaves(jax.jit(fn)(*ARGS))):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_pins_placement_reads_shardings_and_donation():
    eqns = {e.primitive.name + str(i): e for i, (e, _, _) in
            enumerate(ir.walk_eqns(jax.make_jaxpr(f)(*ARGS)))}
    pinned = [k for k, e in eqns.items() if ir.pins_placement(e)]
    assert len(pinned) == 1 and pinned[0].startswith(("jit", "pjit"))
    donating = jax.make_jaxpr(lambda x: jax.jit(lambda y: y + 1, donate_argnums=0)(x))(ARGS[0])
    assert ir.pins_placement(donating.eqns[0])


def test_optimize_inside_shard_map_traces_per_device():
    """Inside jax.shard_map the values vary along its mesh axes: graphopt traces them so
    (a constant meeting them gets JAX's pvary), and around it keeps the body."""
    def loss(w1, w2, x):
        return jnp.mean(jnp.where(x @ w1 < 0, 0.0, jnp.tanh(x @ w1)) @ w2)

    def grads(fn):
        def body(w1, w2, x):
            return jax.lax.pmean(jax.grad(fn, argnums=(0, 1))(w1, w2, x), "data")
        return jax.jit(jax.shard_map(body, mesh=MESH, in_specs=(P(), P(), P("data")),
                                     out_specs=P()))

    want = grads(loss)(*ARGS)
    for got in (grads(graphopt.optimize(loss))(*ARGS),
                graphopt.optimize(grads(loss))(*ARGS)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # one process of its own on 8 host devices, ~10 compiles: leg 1 only
def test_gpt_step_on_8_host_devices():
    script = Path(__file__).with_name("sharded_steps.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", GRAPHOPT_PROGRESS="0")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    fig = json.loads(res.stdout.strip().splitlines()[-1])
    temps = fig["temp_per_device_1_2_4_8"]
    assert all(b < a for a, b in zip(temps, temps[1:])), temps
    assert fig["dp_temp_per_device"] < fig["dp_base_temp_per_device"]
    assert 0 < fig["floor_per_device"] < fig["dp_base_temp_per_device"]  # per device, not global
