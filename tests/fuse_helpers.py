"""Shared helpers for the fusion tests: run one pass with options, check every invariant."""
import jax

from graphopt import ir, testing
from graphopt.errors import EquivalenceError
from graphopt.passes import PassContext, check_interface, placement_of, resolve


def run_pass(name, fn, *args, **options):
    """(before, after, stats) of pass ``name`` on ``fn``'s jaxpr (type-checked)."""
    flat, tree = jax.tree_util.tree_flatten(args)
    cj = jax.make_jaxpr(lambda *xs: fn(*jax.tree_util.tree_unflatten(tree, list(xs))))(*flat)
    ctx = PassContext(placement=placement_of(cj), options=options)
    (p,) = resolve(name)
    res = p(cj, ctx)
    ir.check(res.jaxpr)
    check_interface(name, cj, res.jaxpr)
    assert res.changed == (res.jaxpr is not cj)
    again = p(res.jaxpr, ctx)
    assert not again.changed, f"{name} is not idempotent: {again.stats.hits}"
    return cj, res.jaxpr, res.stats


def check(name, fn, *args, rtol=None, **options):
    """run_pass, then outputs and gradients equal to the original's (jitted, for speed)."""
    cj, out, stats = run_pass(name, fn, *args, **options)
    flat = jax.tree_util.tree_leaves(args)
    res = testing.compare_fns(jax.jit(lambda *x: ir.eval_jaxpr(cj, *x)),
                              jax.jit(lambda *x: ir.eval_jaxpr(out, *x)), flat, True, rtol)
    for k, v in res.items():
        if not v["ok"]:
            raise EquivalenceError(f"{name}: {k} differ, max rel err {v['max_rel_err']:.3g}")
    return cj, out, stats
