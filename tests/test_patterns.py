"""Tests for graphopt.patterns: tree and traced patterns, commutativity, literal wildcards,
jit look-through, privacy of intermediates, user rewrites through the ``user_rewrites`` pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt import ir, patterns as P, testing
from graphopt.interpreter import Stats
from graphopt.transforms import fuse  # noqa: F401  (registers the fuse passes)


def _cj(f, *args):
    return jax.make_jaxpr(f)(*args)


X = jnp.linspace(0.5, 2.0, 6, dtype=jnp.float32)


def test_tree_pattern_commutative_and_literal_wildcard():
    pat = P.op("mul", P.wild("x"), P.lit(name="c"))
    cj1 = _cj(lambda x: x * 3.0, X)
    m1 = P.match(P.View(cj1), pat, cj1.jaxpr.outvars[0])
    cj2 = _cj(lambda x: 3.0 * x, X)
    m2 = P.match(P.View(cj2), pat, cj2.jaxpr.outvars[0])
    assert m1 is not None and m2 is not None
    assert m2.lits["c"] == 3.0 and m2.atoms["x"] is cj2.jaxpr.invars[0]
    # A non-literal operand does not match a literal wildcard.
    cj3 = _cj(lambda x, y: x * y, X, X)
    assert P.match(P.View(cj3), pat, cj3.jaxpr.outvars[0]) is None


def test_same_name_must_bind_same_value():
    pat = P.op("add", P.wild("x"), P.wild("x"))
    ok = _cj(lambda x: x + x, X)
    bad = _cj(lambda x, y: x + y, X, X)
    assert P.match(P.View(ok), pat, ok.jaxpr.outvars[0]) is not None
    assert P.match(P.View(bad), pat, bad.jaxpr.outvars[0]) is None


def test_function_pattern_rewrites_through_jit_and_names():
    rule = P.rewrite(lambda x: jnp.exp(jnp.log(x)), lambda x: x, register=False)

    @jax.jit
    def inner(a):
        return jnp.log(a)

    def f(u, v):
        w = u * 2.0
        return jnp.exp(inner(w)) + v     # the log sits inside a jit call

    cj = _cj(f, X, X)
    st = Stats()
    out = P.apply_rules(cj, [rule], st)
    ir.check(out)
    assert st.hits[rule.name] == 1
    prims = ir.primitive_counts(out)
    assert "exp" not in prims and "log" not in prims
    testing.assert_equivalent(lambda *a: ir.eval_jaxpr(cj, *a), lambda *a: ir.eval_jaxpr(out, *a), X, X)


def test_literal_wildcard_argument_and_replacement_gets_it():
    rule = P.rewrite(lambda x, c: x / c, lambda x, c: x * (1.0 / c), np.ones((4,), np.float32),
                     P.LitArg(), register=False)
    cj = _cj(lambda x: x / 4.0 + x / 2.0, X)
    st = Stats()
    out = P.apply_rules(cj, [rule], st)
    assert st.hits[rule.name] == 2 and "div" not in {e.primitive.name for e in out.jaxpr.eqns
                                                     if e.outvars[0].aval.shape == (6,)}
    np.testing.assert_allclose(ir.eval_jaxpr(out, X)[0], X / 4.0 + X / 2.0, rtol=1e-6)


def test_shared_intermediate_blocks_match_and_says_why():
    rule = P.rewrite(lambda x: jnp.exp(jnp.log(x)), lambda x: x, register=False)
    cj = _cj(lambda x: (lambda l: (jnp.exp(l), l * 2))(jnp.log(x)), X)
    st = Stats()
    out = P.apply_rules(cj, [rule], st)
    assert out is cj and not st.hits
    assert any("also read elsewhere" in n for n in st.notes)


def test_effects_never_matched():
    rule = P.rewrite(lambda x: jnp.sin(x), lambda x: jnp.cos(x), register=False)

    def f(x):
        jax.debug.print("x={x}", x=x)
        return x + 1.0

    cj = _cj(f, X)
    assert P.apply_rules(cj, [rule]) is cj


def test_user_rewrite_pass_and_sub_jaxprs():
    rule = graphopt.patterns.rewrite(lambda x: jnp.tanh(x) * 0.0 + jnp.tanh(x),
                                     lambda x: jnp.tanh(x), name="user.tanh_noise")
    try:
        def f(xs):
            def body(c, x):
                return c + (jnp.tanh(x) * 0.0 + jnp.tanh(x)), None
            return jax.lax.scan(body, 0.0, xs)[0]
        r = testing.check_pass("user_rewrites", f, X)
        assert ir.primitive_counts(r.jaxpr)["tanh"] == 1
        opt = graphopt.optimize(f, passes=["user_rewrites"])
        np.testing.assert_allclose(opt(X), f(X), rtol=1e-6)
        assert "user.tanh_noise" in opt.report(X).hits()
    finally:
        P.unregister(rule)
    assert rule not in P.user_rules()


def test_bad_inputs_give_clear_errors():
    with pytest.raises(TypeError, match="replacement must be a function"):
        P.rewrite(lambda x: x, 3, register=False)
    with pytest.raises(TypeError, match="pattern must be"):
        P.rewrite(42, lambda x: x, register=False)
    with pytest.raises(graphopt.GraphoptError, match="failed to trace"):
        P.rewrite(lambda x, y: x @ y, lambda x, y: x, np.ones((2, 3)), np.ones((2, 3)), register=False)


def test_replacement_with_wrong_shape_is_skipped_with_note():
    rule = P.rewrite(lambda x: jnp.sin(x), lambda x: jnp.sum(x), register=False)
    cj = _cj(lambda x: jnp.sin(x), X)
    st = Stats()
    assert P.apply_rules(cj, [rule], st) is cj
    assert any("replacement gives" in n for n in st.notes)


def test_inline_jits_renames_repeated_bodies():
    f = jax.jit(lambda a: a * 2.0)
    cj = _cj(lambda x: f(x) + f(x + 1.0), X)
    flat, changed = P.inline_jits(cj)
    assert changed and "jit" not in ir.primitive_counts(flat)
    ir.check(flat)
    np.testing.assert_allclose(ir.eval_jaxpr(flat, X)[0], ir.eval_jaxpr(cj, X)[0])


def test_replacement_containing_its_pattern_is_not_rematched():
    # jax.nn.silu is x * sigmoid(x) inside: the fused call is opaque to later matching.
    rule = P.rewrite(lambda x: x * jax.nn.sigmoid(x), lambda x: jax.nn.silu(x), register=False)
    cj = _cj(lambda x: jax.nn.sigmoid(x) * x + 1.0, X)
    st = Stats()
    once = P.apply_rules(cj, [rule], st)
    assert st.hits[rule.name] == 1
    assert sum(P.is_fused_call(e) for e in once.jaxpr.eqns) == 1
    assert P.apply_rules(once, [rule]) is once
