"""graphopt.passes.<name>(**options): a pass with its own settings, checked when built,
under the names graphopt.optimize takes; what it reads wins over the pipeline's options."""
import inspect

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import graphopt
from graphopt import ir, passes, testing
from graphopt.models import mlp

K = jax.random.PRNGKey(0)
DEEP = dict(depth=3, width=32, batch=8, T=16)


def _folded(x):
    return x + jnp.arange(8.0) * 2.0  # a 32-byte constant product folding may create


def test_factories_are_typed_and_refuse_what_their_pass_does_not_read():
    sig = inspect.signature(passes.remat)
    assert "memory_budget" in sig.parameters and "remat_solver" in sig.parameters
    assert "fold_max_bytes" in inspect.signature(passes.prune).parameters
    assert "remat" in dir(passes) and "fold_max_bytes" in passes.prune.__doc__
    with pytest.raises(graphopt.OptionError, match="did you mean 'memory_budget'.*it reads: "):
        passes.remat(memory_budjet=0.25)
    with pytest.raises(graphopt.OptionError, match="'prune' does not read 'memory_budget'"):
        passes.prune(memory_budget=0.5)
    with pytest.raises(graphopt.OptionError, match="'auto', 'milp', 'greedy'"):
        passes.remat(memory_budget=0.5, remat_solver="fast")
    with pytest.raises(AttributeError, match="prnue"):
        passes.prnue()


def test_a_configured_pass_reads_its_own_settings_over_the_pipelines():
    x = jnp.ones(8)
    folded = graphopt.optimize(_folded, passes=["prune"])
    small = graphopt.optimize(_folded, passes=[passes.prune(fold_max_bytes=16)])
    own_wins = graphopt.optimize(_folded, passes=[passes.prune(fold_max_bytes=16)],
                                 fold_max_bytes=65536)
    assert "mul" not in ir.primitive_counts(folded.jaxpr(x))
    for f in (small, own_wins):
        assert "mul" in ir.primitive_counts(f.jaxpr(x))  # 32 bytes > 16: left as written
        np.testing.assert_allclose(f(x), 1.0 + np.arange(8.0) * 2.0)
    assert small.pipeline.passes[1].options == {"fold_max_bytes": 16}


def test_remat_through_its_factory_is_the_same_as_the_option():
    p, b = mlp.init_deep(K, **DEEP), mlp.example_batch_deep(K, **DEEP)
    by_option = graphopt.optimize(mlp.loss_deep, memory_budget=0.5)
    by_factory = graphopt.optimize(mlp.loss_deep, passes=["prune", passes.remat(memory_budget=0.5)])
    rec = [next(r for r in f.report(p, b).records if r.name == "remat").stats.details
           for f in (by_option, by_factory)]
    assert rec[1]["placement"] == "pre-AD" and rec[1].get("segments", 0) >= 1
    assert rec[0]["bytes"] == rec[1]["bytes"] < rec[1]["base_bytes"]
    g0, g1 = jax.grad(mlp.loss_deep)(p, b), jax.grad(by_factory)(p, b)
    for x, y in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        assert testing.max_rel_error(x, y) <= 1e-5


def test_configured_settings_count_where_optimize_and_check_pass_read_them():
    # remat options and a budget given in different places are one setting
    graphopt.optimize(jnp.sin, passes=["prune", passes.remat(memory_budget="1MiB")],
                      remat_solver="greedy")
    with pytest.raises(graphopt.OptionError, match="without memory_budget"):
        graphopt.optimize(jnp.sin, passes=[passes.remat(remat_solver="greedy")])
    assert passes.remat(memory_budget=None, remat_solver="greedy")[0].options == \
        {"remat_solver": "greedy"}  # None is the signature's "not given"
    # a configured precision pass sets check_pass's tolerance, as the option does
    w, x = jnp.ones((8, 8)) / 3, jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)
    testing.check_pass(passes.precision(precision="bfloat16"), lambda w, x: jnp.tanh(x @ w), w, x)
