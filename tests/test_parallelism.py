"""Tests of the parallelism analysis (graphopt/parallelism.py): work, critical path and
available parallelism, and the repeated branches of an ensemble or of attention heads
written as Python loops, even when their results are joined."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt import parallelism

RNG = np.random.default_rng(0)


def arr(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def ensemble(ws, x):
    return jnp.mean(jnp.stack([jnp.tanh(x @ w1) @ w2 for w1, w2 in ws]), 0)


WS = [(arr(8, 16), arr(16, 4)) for _ in range(4)]
X = arr(5, 8)


def test_ensemble_branches_found_though_joined():
    rep = parallelism.analyze(ensemble, WS, X)
    assert len(rep.components) == 1  # the mean joins them: one connected component
    assert 3.5 < rep.parallelism <= 4.0  # the join (stack, mean) is on the path too
    assert rep.total_flops == pytest.approx(4 * (2 * 5 * 8 * 16 + 2 * 5 * 16 * 4 + 5 * 16), rel=0.1)
    (grp,) = rep.repeated
    assert grp.n_branches == 4 and grp.primitives == {"dot_general": 2, "tanh": 1}
    lanes = [set(b) for b in grp.branches]
    assert all(not (a & b) for i, a in enumerate(lanes) for b in lanes[i + 1:])
    for lane in grp.branches:  # each lane reads its own weights only
        reads = {id(v) for i in lane for v in rep.jaxpr.eqns[i].invars}
        own = [k for k, v in enumerate(rep.jaxpr.invars[:8]) if id(v) in reads]
        assert len(own) == 2
    text = repr(rep)
    assert "available parallelism 3." in text and "4 branches × 3 eqns" in text


def test_chain_has_no_branches_and_parallelism_one():
    def chain(w, x):
        for _ in range(3):
            x = jnp.tanh(x @ w)
        return x
    rep = parallelism.analyze(chain, arr(8, 8), X)
    assert rep.repeated == [] and rep.parallelism == 1.0
    assert "repeated branches: none" in repr(rep)
    assert len(rep.critical_path) == rep.n_eqns


def test_jit_wrapped_and_optimized_functions_are_looked_through():
    a = parallelism.analyze(jax.jit(ensemble), WS, X)
    b = parallelism.analyze(graphopt.optimize(ensemble), WS, X)
    assert a.repeated[0].n_branches == b.repeated[0].n_branches == 4


def test_highlight_labels_branches_and_critical_path():
    rep = parallelism.analyze(ensemble, WS, X)
    marks = rep.highlight()
    labels = set(marks.values())
    assert {f"group 0, branch {i}" for i in range(4)} <= labels
    assert all(e in rep.jaxpr.eqns for e in marks)
