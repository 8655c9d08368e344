"""Fusions after AD: a decorated training step differentiates its loss fused
(graphopt/regrad.py). Outputs and updated parameters equal the step as written; the
[tokens, V] logits and [T, T] scores are gone forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import graphopt
from graphopt import ir, regrad, testing
from graphopt.errors import GraphoptError
from graphopt.models import gpt

S = dict(n_layers=1, d_model=16, n_heads=2, seq_len=128, vocab=96)
OPTS = dict(xent_min_bytes=0, xent_chunk=32)
PASSES = ["prune", "fuse_attention", "fuse_cross_entropy"]


@pytest.fixture(scope="module")
def gpt_args():
    k = jax.random.PRNGKey(0)
    p = gpt.init(k, **S)
    batch = gpt.example_batch(k, batch=2, seq_len=S["seq_len"], vocab=S["vocab"])
    return p, gpt.init_opt_state(p), batch


def scores(cj):
    """[T, T] values (nested jaxprs included): what the attention fusion removes."""
    return [f"{e.primitive.name} {v.aval.shape}" for e, _, _ in ir.walk_eqns(cj) for v in e.outvars
            if list(getattr(v.aval, "shape", ())).count(S["seq_len"]) >= 2]


def logits(cj, rows=64):
    """[..., V] values over at least ``rows`` tokens: what the cross-entropy fusion removes."""
    return [f"{e.primitive.name} {v.aval.shape}" for e, _, _ in ir.walk_eqns(cj) for v in e.outvars
            if len(getattr(v.aval, "shape", ())) >= 2 and v.aval.shape[-1] == S["vocab"]
            and np.prod(v.aval.shape[:-1]) >= rows]


def assert_same(f, g, *args, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(f(*args)), jax.tree.leaves(g(*args))):
        assert testing.max_rel_error(a, b) <= rtol


def test_gpt_step_fuses_attention_and_cross_entropy_through_ad(gpt_args):
    step = graphopt.optimize(gpt.train_step, passes=PASSES, **OPTS)
    rep = step.report(*gpt_args)
    first = rep.records[0]
    assert first.name == "fuse_before_ad" and first.changed
    assert first.stats.hits["fuse.cross_entropy"] == 1
    assert sum(v for k, v in first.stats.hits.items() if k.startswith("fuse.attention")) == 1
    assert rep.placement == "post-AD"
    # as written the step holds [T, T] scores and [tokens, V] logits, forward and backward
    assert scores(rep.original) and logits(rep.original)
    assert scores(step.jaxpr(*gpt_args)) == []
    assert logits(step.jaxpr(*gpt_args)) == []
    assert_same(jax.jit(gpt.train_step), step, *gpt_args)


@pytest.mark.slow  # over 25 s on 2 cores: leg 1 only (.ci/run)
def test_check_compares_against_the_step_as_written(gpt_args):
    step = graphopt.optimize(gpt.train_step, passes=PASSES, check=True, **OPTS)
    step(*gpt_args)
    rep = step.report(*gpt_args)
    assert rep.check_errors and all(v["ok"] for v in rep.check_errors.values())
    assert ir.count_eqns(rep.original) != ir.count_eqns(rep.records[0].after)


def test_closure_over_the_batch_and_a_second_derivative():
    w0 = jax.random.normal(jax.random.key(1), (8, 64)) * 0.3
    h = jax.random.normal(jax.random.key(2), (4, 16, 8))
    y = jax.random.randint(jax.random.key(3), (4, 16), 0, 64)

    def step(w, h, y):
        loss = lambda w: optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()
        g = jax.grad(loss)(w)                                   # closes over traced h, y
        curv = jax.grad(lambda w: jnp.vdot(jax.grad(loss)(w), g))(w)   # Hessian-vector
        return w - 0.1 * g, curv
    opt = graphopt.optimize(step, passes=["prune", "fuse_cross_entropy"], **OPTS)
    assert opt.report(w0, h, y).records[0].stats.hits["fuse.cross_entropy"] >= 1
    assert_same(jax.jit(step), opt, w0, h, y, rtol=1e-4)


def test_grad_is_restored_even_when_tracing_fails():
    before = (jax.grad, jax.value_and_grad)

    def step(w):
        jax.grad(lambda w: (w ** 2).sum())(w)
        raise RuntimeError("user error")
    with pytest.raises(RuntimeError, match="user error"):
        graphopt.optimize(step)(jnp.ones(3))
    assert (jax.grad, jax.value_and_grad) == before


def test_a_refusing_pass_differentiates_the_function_as_written():
    def refuse(cj, ctx):
        raise GraphoptError("refused on purpose")
    w = jnp.ones((3, 4))
    step = lambda w: w - jax.grad(lambda w: jnp.tanh(w).sum())(w)
    found = []
    with regrad.fusing_grads([refuse], {}, found):
        out = jax.jit(step)(w)
    assert found and found[0].error and "refused on purpose" in found[0].error
    np.testing.assert_allclose(out, jax.jit(step)(w))


def test_switched_off_and_not_caught_spellings_keep_the_post_ad_hint(gpt_args):
    step = graphopt.optimize(gpt.train_step, passes=PASSES, fuse_before_ad=False, **OPTS)
    rep = step.report(*gpt_args)
    assert all(r.name != "fuse_before_ad" for r in rep.records)
    assert any("before jax.grad" in n or "decorate the loss" in n for n in rep.notes()), rep.notes()


def test_nnx_and_equinox_steps_fuse_through_their_own_grads():
    nnx = pytest.importorskip("flax.nnx")
    eqx = pytest.importorskip("equinox")
    V = 64
    h = jax.random.normal(jax.random.key(4), (4, 16, 8))
    y = jax.random.randint(jax.random.key(5), (4, 16), 0, V)
    xent = optax.softmax_cross_entropy_with_integer_labels   # labels are traced arguments

    model = nnx.Linear(8, V, rngs=nnx.Rngs(0))
    ref_model = nnx.Linear(8, V, rngs=nnx.Rngs(0))

    def nnx_step(m, h, y):
        loss, g = nnx.value_and_grad(lambda m: xent(m(h), y).mean())(m)
        nnx.update(m, jax.tree.map(lambda p, d: p - 0.1 * d, nnx.state(m, nnx.Param), g))
        return loss
    fused = graphopt.optimize(nnx_step, passes=["prune", "fuse_cross_entropy"], **OPTS)
    assert fused.report(model, h, y).records[0].stats.hits["fuse.cross_entropy"] == 1
    for _ in range(3):
        np.testing.assert_allclose(fused(model, h, y), nnx.jit(nnx_step)(ref_model, h, y),
                                   rtol=1e-5)
    np.testing.assert_allclose(model.kernel.value, ref_model.kernel.value, rtol=1e-5)

    lin = eqx.nn.Linear(8, V, key=jax.random.key(6))

    def eqx_step(m, h, y):
        loss, g = eqx.filter_value_and_grad(lambda m: xent(jax.vmap(jax.vmap(m))(h), y).mean())(m)
        return loss, eqx.apply_updates(m, jax.tree.map(lambda d: -0.1 * d, g))
    fused = graphopt.optimize(eqx_step, passes=["prune", "fuse_cross_entropy"], **OPTS)
    assert fused.report(lin, h, y).records[0].stats.hits["fuse.cross_entropy"] == 1
    assert_same(eqx.filter_jit(eqx_step), fused, lin, h, y)
