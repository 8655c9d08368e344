"""Regressions from the outside audit of the public API: requests that were silently
ignored, errors that did not name the problem, arguments jax.jit accepts."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import graphopt
from graphopt import ir, testing
from graphopt.models import mlp

K = jax.random.PRNGKey(0)
DEEP = dict(depth=3, width=32, batch=8, T=16)


def _deep():
    return mlp.init_deep(K, **DEEP), mlp.example_batch_deep(K, **DEEP)


def _remat_record(f, *args):
    return next(r for r in f.report(*args).records if r.name == "remat")


# ----------------------------------------------------------- silently ignored requests

def test_memory_budget_on_a_loss_steers_what_grad_saves():
    # optimize(loss, memory_budget=...) then jax.grad used to change nothing (a note only)
    p, b = _deep()
    f = graphopt.optimize(mlp.loss_deep, memory_budget=0.5)
    details = _remat_record(f, p, b).stats.details
    assert details["placement"] == "pre-AD" and details.get("segments", 0) >= 1
    assert details["bytes"] <= details["budget_bytes"] * 1.05 < details["base_bytes"]
    assert "custom_vjp_call" in ir.primitive_counts(f.jaxpr(p, b))
    v0, g0 = jax.value_and_grad(mlp.loss_deep)(p, b)
    v1, g1 = jax.value_and_grad(f)(p, b)
    assert testing.max_rel_error(v0, v1) <= 1e-6
    for x, y in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        assert testing.max_rel_error(x, y) <= 1e-5


@pytest.mark.parametrize("options, word", [
    ({"memory_budjet": 0.25}, "did you mean 'memory_budget'"),
    ({"donate": "yes"}, "donate must be 'auto', None or False"),
    ({"remat_micro_batches": True}, "without memory_budget"),
    ({"memory_budget": 0.5, "remat_solver": "fast"}, "'auto', 'milp', 'greedy'"),
    ({"fold_max_bytes": "lots"}, "cannot read fold_max_bytes"),
])
def test_options_are_checked_when_optimize_is_called(options, word):
    with pytest.raises(graphopt.OptionError, match=word):
        graphopt.optimize(jnp.sin, **options)
    with pytest.raises(TypeError):  # a misspelt keyword is a TypeError, as for any function
        graphopt.optimize(jnp.sin, memory_budjet=0.25)


def test_a_pass_list_that_is_not_one_is_named():
    with pytest.raises(graphopt.OptionError, match="passes must be a list.*got int 42"):
        graphopt.optimize(jnp.sin, passes=42)
    with pytest.raises(ValueError, match="unknown pass 'prnue'"):
        graphopt.optimize(jnp.sin, passes=["prnue"])


# ----------------------------------------------------------------- budgets and errors

@pytest.mark.parametrize("budget, ok", [
    (np.int64(20000), True), (np.float32(0.5), True), ("64KiB", True),
    ("0", False), ("0GiB", False), (0, False), (1.5, False), (True, False), ("plenty", False),
])
def test_budgets_are_read_or_refused_at_construction(budget, ok):
    for make in (graphopt.optimize, graphopt.remat):
        if ok:
            make(jnp.sin, memory_budget=budget)
        else:
            with pytest.raises(ValueError, match="memory_budget"):
                make(jnp.sin, memory_budget=budget)


def test_fold_max_bytes_reads_units():
    f = graphopt.optimize(lambda x: x + jnp.arange(8.0) * 2.0, fold_max_bytes="64KiB")
    assert f.options["fold_max_bytes"] == 65536
    np.testing.assert_allclose(f(jnp.ones(8)), 1.0 + np.arange(8.0) * 2.0)


@pytest.mark.slow  # minutes of compiles: the full leg only (CI leg 1)
def test_infeasible_budget_reaches_the_caller_as_budget_error():
    p, b = _deep()
    s = mlp.init_opt_state(p)
    step = graphopt.optimize(mlp.train_step_deep, memory_budget=1, remat_micro_batches=False)
    with pytest.raises(graphopt.BudgetError, match="smallest feasible budget") as e:
        step(p, s, b)
    assert isinstance(e.value, ValueError) and isinstance(e.value, graphopt.GraphoptError)
    assert e.value.budget_bytes == 1 and e.value.floor_bytes > 1
    assert e.value.base_bytes >= e.value.floor_bytes
    loss = graphopt.remat(mlp.loss_deep, memory_budget=1)
    with pytest.raises(graphopt.BudgetError) as e:
        jax.grad(loss)(p, b)
    assert e.value.floor_bytes > 1


# ------------------------------------------------------------------ graphopt.remat

def test_remat_keeps_weak_types():
    # a Python float argument is weakly typed: a bfloat16 loss stays bfloat16
    def loss(w, scale):
        return jnp.sum(jnp.tanh(w * scale) ** 2)
    w = jnp.ones((16,), jnp.bfloat16)
    want = loss(w, 0.5)
    got = graphopt.remat(loss, memory_budget=1.0)(w, 0.5)  # tiny: no budget below is feasible
    assert want.dtype == got.dtype == jnp.bfloat16
    assert float(got) == float(want)


def test_remat_takes_static_arguments_like_jit():
    def loss(params, batch, train, n_layers):
        x, y = batch
        for _ in range(n_layers):
            x = jnp.tanh(x @ params["w"])
            if train:
                x = x * 0.5
        return jnp.mean((x - y) ** 2)
    p = {"w": jax.random.normal(K, (8, 8))}
    batch = (jax.random.normal(K, (4, 8)), jnp.zeros((4, 8)))
    r = graphopt.remat(loss, memory_budget=1.0, static_argnames=("train", "n_layers"))
    for train in (False, True):
        want = jax.grad(loss)(p, batch, train, 2)
        got = jax.grad(r)(p, batch, train=train, n_layers=2)
        assert testing.max_rel_error(want["w"], got["w"]) <= 1e-5


def test_remat_info_answers_for_the_signature_asked():
    p, b8 = _deep()
    b4 = jax.tree_util.tree_map(lambda a: a[:4], b8)
    r = graphopt.remat(mlp.loss_deep, memory_budget=0.5)
    i8, i4 = r.info(p, b8), r.info(p, b4)
    assert i8["base_bytes"] != i4["base_bytes"]
    assert r.info(p, b8)["base_bytes"] == i8["base_bytes"]


def test_remat_old_option_names_still_read():
    p, b = _deep()
    r = graphopt.remat(mlp.loss_deep, memory_budget=0.5, solver="greedy", max_cuts=16)
    assert r.options["remat_solver"] == "greedy" and r.options["remat_max_cuts"] == 16
    assert r.info(p, b)["solver"] == "greedy"


# ---------------------------------------------------------------- static arguments

def test_static_argnums_and_argnames_with_the_numbered_one_by_keyword():
    def f(x, n, mode="a"):
        return x * n if mode == "a" else x
    x = jnp.ones(2)
    want = jax.jit(f, static_argnums=(1,), static_argnames=("mode",))(x, n=3, mode="a")
    g = graphopt.optimize(f, static_argnums=(1,), static_argnames=("mode",))
    np.testing.assert_array_equal(g(x, n=3, mode="a"), want)
    np.testing.assert_array_equal(g(x, 3, mode="b"), x)


def test_forward_mode_through_remat_segments_names_the_pass():
    # custom_vjp segments cannot be differentiated in forward mode: JAX's error gets a
    # note naming the pass that made them and how to do without
    p, b = _deep()
    f = graphopt.optimize(mlp.loss_deep, passes=["remat"], memory_budget=0.5)
    jax.grad(f)(p, b)  # reverse mode works
    tangent = jax.tree_util.tree_map(jnp.ones_like, p)
    with pytest.raises(TypeError, match="forward-mode") as e:
        jax.jvp(lambda q: f(q, b), (p,), (tangent,))
    assert any("remat rewrote part of the program as jax.custom_vjp" in n
               for n in getattr(e.value, "__notes__", []))
