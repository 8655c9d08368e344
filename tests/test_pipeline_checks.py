"""The full jaxpr type check after every pass is on in tests and behind a flag for users
(most of the pipeline's time on large steps); the interface check always runs."""
import jax
import jax.numpy as jnp
import pytest

import graphopt
from graphopt import ir
from graphopt.errors import PassError
from graphopt.passes import PassResult, Pipeline, full_checks

X = jnp.ones((4, 3), jnp.float32)


def _ill_typed(cj, ctx):
    """Gives sin's result a wrong shape inside the body; the outputs keep their avals."""
    j = cj.jaxpr
    e = j.eqns[0]
    bad = e.replace(outvars=[ir.new_var(ir.ShapedArray((7,), jnp.float32))])
    cos = j.eqns[1].replace(invars=[bad.outvars[0]])
    return PassResult(ir.closed(ir.make_jaxpr_from(j, eqns=[bad, cos]), cj.consts), True)


def _cj():
    return jax.make_jaxpr(lambda x: jnp.cos(jnp.sin(x)))(X)


def test_full_check_follows_the_flag(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CHECK_JAXPR", "1")
    assert full_checks()
    with pytest.raises(PassError, match="'_ill_typed' produced an ill-typed jaxpr"):
        Pipeline([_ill_typed], fixpoint=False).run(_cj())
    monkeypatch.setenv("GRAPHOPT_CHECK_JAXPR", "0")
    assert not full_checks()
    # off by default: the body is not type-checked, only the interface
    out, records = Pipeline([_ill_typed], fixpoint=False).run(_cj())
    assert records[0].changed and out.jaxpr.eqns[0].outvars[0].aval.shape == (7,)
    # check="full" checks whatever the flag says
    with pytest.raises(PassError, match="ill-typed"):
        Pipeline([_ill_typed], check="full", fixpoint=False).run(_cj())


def test_jax_enable_checks_turns_the_full_check_on(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CHECK_JAXPR", "0")
    with jax.enable_checks(True):
        assert full_checks()
    assert not full_checks()


def test_interface_check_runs_without_the_flag(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CHECK_JAXPR", "0")

    def shrink(cj, ctx):
        return PassResult(jax.make_jaxpr(jnp.sum)(X), True)
    with pytest.raises(PassError, match="'shrink' changed the outputs"):
        graphopt.optimize(jnp.sin, passes=[shrink])(X)


def test_a_round_skips_passes_nothing_new_reached():
    # cse merges, dce drops the dead copy; in round 1 only fold and simplify run again
    # (cse and dce saw nothing but dce's removals since), and the result is a fixpoint.
    def f(x):
        a, b = jnp.sin(x), jnp.sin(x)
        unused = jnp.cos(x)  # noqa: F841
        return a * 1.0 + b
    cj = jax.make_jaxpr(f)(jnp.ones(3))
    out, records = Pipeline(["fold", "simplify", "cse", "dce"]).run(cj)
    ran = [(r.name, r.round) for r in records]
    assert ran == [("fold", 0), ("simplify", 0), ("cse", 0), ("dce", 0),
                   ("fold", 1), ("simplify", 1)], ran
    assert [r.changed for r in records] == [False, True, True, True, False, False]
    again, _ = Pipeline(["fold", "simplify", "cse", "dce"]).run(out)
    assert ir.count_eqns(again) == ir.count_eqns(out) == 2  # sin, add
