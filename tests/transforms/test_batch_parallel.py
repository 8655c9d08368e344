"""Tests of the branch-batching pass (transforms/batch_parallel.py): an ensemble and
attention heads written as Python loops become batched equations when forced (pre-AD
and post-AD, outputs and gradients equal), the CPU cost model declines in the default
pipeline, refusals are reported, and the option is checked."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import graphopt
from graphopt import OptionError, ir, testing
from graphopt.passes import PassContext
from graphopt.transforms.batch_parallel import batch_parallel_pass

FORCE = {"batch_parallel": "force"}


def ens_init(k, d=4, h=6, o=2, seed=0):
    rng = np.random.default_rng(seed)
    return [{"w1": jnp.asarray(rng.standard_normal((d, h)), jnp.float32),
             "b1": jnp.asarray(rng.standard_normal(h), jnp.float32),
             "w2": jnp.asarray(rng.standard_normal((h, o)), jnp.float32)} for _ in range(k)]


def ens_loss(ps, x):  # tanh: a primitive, not a custom_jvp, so whole lanes batch
    preds = [jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] for p in ps]
    return jnp.sum(jnp.stack(preds) ** 2)


def heads(ws, x):
    outs = []
    for w in ws:  # q, k, v projections of one head, then attention
        q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
        outs.append(jax.nn.softmax(q @ k.T, -1) @ v)
    return jnp.concatenate(outs, -1)


X = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4)), jnp.float32)


def dots(cj) -> int:
    return ir.primitive_counts(cj).get("dot_general", 0)


def test_forced_ensemble_pre_ad_batches_dots_outputs_and_gradients_equal():
    ps = ens_init(3)
    res = testing.check_pass(batch_parallel_pass, ens_loss, ps, X, options=FORCE)
    assert dots(jax.make_jaxpr(ens_loss)(ps, X)) == 6
    assert dots(res.jaxpr) == 2
    assert res.stats.hits["batch_parallel.eqns_batched"] >= 6


def test_forced_training_step_post_ad_batches_forward_and_backward():
    ps = ens_init(3)
    step = jax.value_and_grad(ens_loss)
    before = jax.make_jaxpr(step)(ps, X)
    # the step's outputs are the gradients: compared without differentiating them again
    res = testing.check_pass(batch_parallel_pass, step, ps, X, options=FORCE,
                             ctx=PassContext(placement="post-AD"), grads=False)
    assert dots(before) == 15 and dots(res.jaxpr) <= 5


def test_heads_loop_q_k_v_packs_are_sliced_per_use():
    rng = np.random.default_rng(2)
    ws = [{n: jnp.asarray(rng.standard_normal((4, 2)), jnp.float32) for n in "qkv"}
          for _ in range(2)]
    res = testing.check_pass(batch_parallel_pass, heads, ws, X, options=FORCE)
    assert dots(jax.make_jaxpr(heads)(ws, X)) == 10 and dots(res.jaxpr) == 3


def test_default_pipeline_declines_on_cpu_and_force_applies():
    # the bench's sizes (traced, never run): 8 MLPs 16 -> 64 -> 4 on a batch of 32
    big, xb = ens_init(8, d=16, h=64, o=4), jnp.zeros((32, 16))
    default = graphopt.optimize(ens_loss)
    assert dots(default.jaxpr(big, xb)) == 16
    notes = [n for r in default.report(big, xb).records if r.name == "batch_parallel"
             for n in r.stats.notes]
    assert any("cost model" in n and "force" in n for n in notes), notes
    ps = ens_init(3)
    forced = graphopt.optimize(ens_loss, batch_parallel="force")
    assert dots(forced.jaxpr(ps, X)) == 2
    testing.assert_equivalent(jax.jit(ens_loss), forced, ps, X)  # grad outside the decorator


def test_cost_model_says_yes_on_gpu():
    cj = jax.make_jaxpr(ens_loss)(ens_init(8, d=16, h=64, o=4), jnp.zeros((32, 16)))
    assert batch_parallel_pass(cj, PassContext(platform="gpu")).changed
    assert not batch_parallel_pass(cj, PassContext(platform="cpu")).changed


def test_refusals_are_reported_and_left_as_written():
    @jax.custom_vjp
    def clip_grad(x):
        return x

    clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1, 1),))

    def f(ps, x):
        ys = []
        for p in ps:
            h = clip_grad(x @ p["w1"])
            ys.append(lax.while_loop(lambda c: c[1] < 2, lambda c: (c[0] * 0.5, c[1] + 1),
                                     (h, 0))[0])
        return jnp.stack(ys)
    ps = ens_init(2)
    res = testing.check_pass(batch_parallel_pass, f, ps, X, options=FORCE)
    notes = " ".join(res.stats.notes)
    assert "custom_vjp_call" in notes and "while" in notes, notes
    counts = ir.primitive_counts(res.jaxpr)
    assert counts["while"] == 2 and dots(res.jaxpr) == 1
    assert sum(v for k, v in counts.items() if k.startswith("custom_vjp")) == 2


def _scaled_sin(scale):
    """sin with a gradient scaled by ``scale``: same body, a different rule per member."""
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)
    f.defjvp(lambda p, t: (jnp.sin(p[0]), t[0] * scale))
    return f


def test_custom_jvp_lanes_batched_each_keeps_its_own_rule():
    acts = [_scaled_sin(float(i + 1)) for i in range(3)] + [jax.nn.relu]

    def f(ps, x):
        return sum(jnp.sum(act(x @ p["w1"])) for act, p in zip(acts, ps))
    ps = ens_init(4)
    before = jax.make_jaxpr(f)(ps, X)
    # gradients equal: each lane still uses its own rule
    res = testing.check_pass(batch_parallel_pass, f, ps, X, options=FORCE)
    assert dots(before) == 4 and dots(res.jaxpr) == 1
    assert not any("custom_jvp" in n for n in res.stats.notes)


def test_switched_off_and_bad_option():
    cj = jax.make_jaxpr(ens_loss)(ens_init(2), X)
    res = batch_parallel_pass(cj, PassContext(options={"batch_parallel": False}))
    assert not res.changed and "switched off" in res.stats.notes[0]
    with pytest.raises(OptionError, match="batch_parallel"):
        graphopt.optimize(ens_loss, batch_parallel="sometimes")


def test_forced_under_jit_with_named_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    ps = ens_init(2)
    f = graphopt.optimize(ens_loss, batch_parallel="force")
    g = jax.jit(jax.grad(f), in_shardings=(None, shard))
    testing.assert_equivalent(jax.jit(jax.grad(ens_loss)), g, ps, X, grads=False)


@settings(max_examples=2, deadline=None)
@given(k=st.integers(2, 4), layers=st.integers(1, 2))
def test_property_random_ensembles_batch_to_one_dot_per_layer(k, layers):
    rng = np.random.default_rng(k * 10 + layers)
    ws = [[jnp.asarray(rng.standard_normal((4, 4)), jnp.float32) for _ in range(layers)]
          for _ in range(k)]

    def f(ws, x):
        outs = []
        for member in ws:
            h = x
            for w in member:
                h = jnp.sin(h @ w)
            outs.append(h)
        return sum(outs)
    res = testing.check_pass(batch_parallel_pass, f, ws, X, options=FORCE)
    assert dots(res.jaxpr) == layers
