"""Control flow nested three deep: every pass reaches the innermost level, and the
optimized program keeps outputs (and gradients where JAX can differentiate) equal."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import graphopt
from graphopt import ir, testing

XS = jnp.array([0.5, -1.0, 2.0, 0.25], jnp.float32)


def redundant(v):
    """Innermost body: one of each thing the pruning family removes."""
    dead = jnp.exp(v) * 5.0                          # dce
    a = jnp.sin(v) * 1.0 + 0.0                       # simplify
    b = jnp.sin(v)                                   # cse with the sin above
    return a + b * (jnp.float32(2.0) * 0.5) - (-(-v))  # fold, simplify


def cond_in_scan_in_while(xs):
    def wbody(c):
        i, acc = c
        def sbody(s, x):
            return s + lax.cond(x > 0, redundant, lambda v: v * 1.0, x + s * 0.1), None
        return i + 1, acc + lax.scan(sbody, 0.0, xs)[0]
    return lax.while_loop(lambda c: c[0] < 2, wbody, (0, 0.0))[1]


def scan_in_cond_in_scan(xs):
    def outer(c, x):
        def inner(v):
            return lax.scan(lambda s, y: (s + redundant(y * v), None), 0.0, xs)[0]
        return c + lax.cond(x > 0, inner, lambda v: v * 2.0, x), None
    return lax.scan(outer, 0.0, xs)[0]


def while_in_scan_in_cond(xs):
    def branch(xs):
        def sbody(c, x):
            def wbody(s):
                j, v = s
                return j + 1, redundant(v)
            return c + lax.while_loop(lambda s: s[0] < 2, wbody, (0, x))[1], None
        return lax.scan(sbody, 0.0, xs)[0]
    return lax.cond(xs[0] > 0, branch, lambda xs: jnp.sum(xs), xs)


def fori_in_jit_in_checkpoint(xs):
    def body(i, c):
        return c + jax.jit(lambda v: redundant(v))(xs[i])
    inner = lambda xs: lax.fori_loop(0, 4, body, 0.0)  # static trip count: a scan
    return jax.checkpoint(lambda xs: jax.jit(inner)(xs))(xs)


def switch_in_scan_in_scan(xs):
    def outer(c, x):
        def inner(s, y):
            idx = jnp.clip(jnp.floor(y).astype(jnp.int32) + 1, 0, 2)
            return s + lax.switch(idx, [redundant, jnp.cos, lambda v: v * 1.0], y * x), None
        return c + lax.scan(inner, 0.0, xs)[0], None
    return lax.scan(outer, 0.0, xs)[0]


NESTS = {
    "cond_in_scan_in_while": (cond_in_scan_in_while, False),
    "scan_in_cond_in_scan": (scan_in_cond_in_scan, True),
    "while_in_scan_in_cond": (while_in_scan_in_cond, False),
    "fori_in_jit_in_checkpoint": (fori_in_jit_in_checkpoint, True),
    "switch_in_scan_in_scan": (switch_in_scan_in_scan, True),
}


def _innermost_sins(cj):
    return [(d, e) for e, _, d in ir.walk_eqns(cj) if e.primitive.name == "sin"]


@pytest.mark.parametrize("name", sorted(NESTS))
def test_nested_three_deep(name):
    f, differentiable = NESTS[name]
    res = testing.check_pass("prune", f, XS, grads=differentiable)
    cj = jax.make_jaxpr(f)(XS)
    sins_before = _innermost_sins(cj)
    assert sins_before and min(d for d, _ in sins_before) >= 3, "expected depth >= 3"
    h = res.stats.hits
    # each family fired at the innermost level
    assert h["cse.sin"] >= 1 and h["simplify.mul_one"] >= 1 and h["simplify.neg_neg"] >= 1
    assert h["fold.mul"] >= 1 and h["dce.eqn"] >= 1
    after = ir.primitive_counts(res.jaxpr)
    assert after["sin"] == len(sins_before) // 2
    assert "exp" not in after and "neg" not in after
    assert ir.count_eqns(res.jaxpr) < ir.count_eqns(cj)


@pytest.mark.parametrize("name", sorted(NESTS))
def test_nested_through_optimize(name):
    f, differentiable = NESTS[name]
    opt = graphopt.optimize(f, check=True)  # check compares outputs and gradients
    np.testing.assert_allclose(opt(XS), jax.jit(f)(XS), rtol=1e-5)
    if differentiable:
        np.testing.assert_allclose(jax.grad(opt)(XS), jax.jit(jax.grad(f))(XS), rtol=1e-5)


def test_nested_dce_of_carries():
    def f(xs):
        def outer(c, x):
            a, b = c
            def inner(s, y):
                p, q = s
                return (p + y * x, q * jnp.exp(y)), jnp.cos(y)  # q and ys dead
            (p, q), ys = lax.scan(inner, (0.0, 1.0), xs)
            return (a + p, b + q), None
        return lax.scan(outer, (0.0, 0.0), xs)[0][0]
    res = testing.check_pass("dce", f, XS)
    assert res.stats.hits["dce.scan_outputs"] >= 2
    p = ir.primitive_counts(res.jaxpr)
    assert "exp" not in p and "cos" not in p


def test_grad_of_nested_loops_is_pruned_post_ad():
    f = NESTS["scan_in_cond_in_scan"][0]
    g = jax.grad(f)
    opt = graphopt.optimize(g)
    assert opt.report(XS).placement == "post-AD"
    np.testing.assert_allclose(opt(XS), jax.jit(g)(XS), rtol=1e-5)
    assert ir.count_eqns(opt.jaxpr(XS)) < ir.count_eqns(opt.original_jaxpr(XS))
