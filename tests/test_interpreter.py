"""Tests of the rewriting interpreter (graphopt/interpreter.py) and the graph view (ir):
rule tables and their default, recursion into every higher-order primitive, unknown
primitives passed through and counted, rule failures turned into RewriteError."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import mlir

import graphopt
from graphopt import ir, testing
from graphopt.errors import RewriteError
from graphopt.interpreter import CannotRewrite, RuleTable, Stats, keep, rewrite
from graphopt.passes import PassContext, PassResult, resolve

V = jnp.array([0.3, -1.2, 2.5, 0.7], jnp.float32)

# A primitive graphopt has never heard of (registered after graphopt was imported).
unknown_p = Primitive("graphopt_test_unknown_interp")
unknown_p.def_impl(lambda x: x * 3.0)
unknown_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(unknown_p, mlir.lower_fun(lambda x: x * 3.0, multiple_results=False))


# A table rewriting mul(x, 2) -> add(x, x): exact, so outputs and gradients must match.
DOUBLE = RuleTable("double")


@DOUBLE.register("mul")
def _mul_two(rw, eqn):
    x, y = eqn.invars
    if ir.is_literal(y) and float(np.asarray(ir.literal_value(y))) == 2.0 \
            and ir.same_aval(x.aval, eqn.outvars[0].aval):
        rw.hit("double.mul_two")
        return rw.bind(lambda a: a + a, x)
    return None


def double_pass(cj, ctx=None):
    stats = Stats()
    out = rewrite(cj, DOUBLE, stats)
    return PassResult(out, out is not cj, stats)


def test_rule_table_lookup_and_default():
    t = RuleTable("t")
    assert t.lookup("sin") is keep and "sin" not in t

    @t.register("sin", "cos")
    def r(rw, eqn):
        return None
    assert t.lookup("cos") is r and "sin" in t
    t2 = RuleTable("t2", default=r)
    assert t2.lookup("anything") is r
    assert "t2" in repr(t2)


def test_rewrite_returns_same_object_when_nothing_changes():
    cj = jax.make_jaxpr(lambda x: jnp.sin(x) + 1.0)(V)
    stats = Stats()
    assert rewrite(cj, DOUBLE, stats) is cj
    assert not stats.hits


def _custom_jvp_fn():
    @jax.custom_jvp
    def g(x):
        return x * 2.0

    @g.defjvp
    def g_jvp(p, t):
        return g(p[0]), t[0] * 2.0
    return g


def _custom_vjp_fn():
    @jax.custom_vjp
    def g(x):
        return x * 2.0

    g.defvjp(lambda x: (x * 2.0, None), lambda _, ct: (ct * 2.0,))
    return g


def _shard_map(x):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("i",))
    P = jax.sharding.PartitionSpec
    # check_vma=False keeps the literal 2.0 a literal (no pvary in front of it).
    return jax.shard_map(lambda a: a * 2.0, mesh=mesh, in_specs=P("i"), out_specs=P("i"),
                         check_vma=False)(x)


HIGHER_ORDER = {
    "jit": lambda x: jax.jit(lambda a: a * 2.0)(x),
    "cond": lambda x: lax.cond(x[0] > 0, lambda a: a * 2.0, lambda a: a - 1.0, x),
    "switch": lambda x: lax.switch(1, [lambda a: a + 1.0, lambda a: a * 2.0, jnp.sin], x),
    "while": lambda x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2.0),
                                      (0, x))[1],
    "scan": lambda x: lax.scan(lambda c, a: (c * 2.0, a * 2.0), x, x)[1],
    "custom_jvp_call": lambda x: _custom_jvp_fn()(x),
    "custom_vjp_call": lambda x: _custom_vjp_fn()(x),
    "remat": lambda x: jax.checkpoint(lambda a: jnp.sin(a) * 2.0)(x),
    "shard_map": _shard_map,
}


@pytest.mark.parametrize("name", sorted(HIGHER_ORDER))
def test_rules_reach_every_sub_jaxpr(name):
    f = HIGHER_ORDER[name]
    cj = jax.make_jaxpr(f)(V)
    assert any(d > 0 for _, _, d in ir.walk_eqns(cj)), "expected a nested jaxpr"
    res = double_pass(cj)
    ir.check(res.jaxpr)
    assert res.stats.hits["double.mul_two"] >= 1
    # every mul-by-two at every depth is gone
    assert not any(e.primitive.name == "mul" and any(
        ir.is_literal(a) and float(np.asarray(ir.literal_value(a))) == 2.0 for a in e.invars)
        for e, _, _ in ir.walk_eqns(res.jaxpr))
    grads = name not in ("while",)
    for k, v in testing.compare_jaxprs(cj, res.jaxpr, [V], grads=grads).items():
        assert v["ok"], (k, v)
    assert double_pass(res.jaxpr).jaxpr is res.jaxpr  # idempotent


def test_closed_call_sub_jaxpr():
    inner = jax.make_jaxpr(lambda a: a * 2.0)(V)
    from jax.extend.core.primitives import closed_call_p
    a, b = ir.new_var(ir.aval_of(V)), ir.new_var(ir.aval_of(V))
    eqn = ir.new_eqn([a], [b], closed_call_p, {"call_jaxpr": inner},
                     source_info=inner.jaxpr.eqns[0].source_info)
    cj = ir.closed(ir.make_jaxpr_from(_template(), invars=[a], outvars=[b], eqns=[eqn]), [])
    res = double_pass(cj)
    ir.check(res.jaxpr)
    assert res.stats.hits["double.mul_two"] == 1
    np.testing.assert_allclose(ir.eval_jaxpr(res.jaxpr, V)[0], V * 2.0)


def test_open_sub_jaxpr_refuses_array_constants():
    # remat holds an open jaxpr: a rule adding an array constant there must back off.
    t = RuleTable("addconst")
    c = np.arange(4.0, dtype=np.float32)

    @t.register("sin")
    def r(rw, eqn):
        rw.hit("addconst")
        return rw.bind(lambda a: jnp.sin(a) + c - c, eqn.invars[0])
    cj = jax.make_jaxpr(lambda x: jax.checkpoint(jnp.sin)(x) + jnp.sin(x))(V)
    stats = Stats()
    out = rewrite(cj, t, stats)
    ir.check(out)
    assert any("array constant inside an open sub-jaxpr" in n for n in stats.notes)
    (remat,) = [e for e in out.jaxpr.eqns if e.primitive.name == "remat2"]
    assert [e.primitive.name for e in remat.params["jaxpr"].eqns] == ["sin"]
    assert out.consts  # the top level accepted its constant
    np.testing.assert_allclose(ir.eval_jaxpr(out, V)[0], 2 * np.sin(V), rtol=1e-6)


def test_cannot_rewrite_keeps_equation_and_notes_why():
    t = RuleTable("refuse")

    @t.register("sin")
    def r(rw, eqn):
        rw.bind(jnp.cos, eqn.invars[0])  # emitted, then rolled back
        raise CannotRewrite("not today")
    cj = jax.make_jaxpr(jnp.sin)(V)
    stats = Stats()
    out = rewrite(cj, t, stats)
    assert ir.primitive_counts(out) == {"sin": 1}
    assert stats.notes == ["refuse: kept sin: not today"]


def test_rule_exception_becomes_rewrite_error_with_table_primitive_and_line():
    t = RuleTable("broken_table")

    @t.register("sin")
    def r(rw, eqn):
        raise ZeroDivisionError("boom")

    def user_fn(x):
        return jnp.sin(x) * 3.0
    cj = jax.make_jaxpr(user_fn)(V)
    with pytest.raises(RewriteError) as ei:
        rewrite(cj, t)
    msg = str(ei.value)
    assert "broken_table" in msg and "'sin'" in msg and "boom" in msg
    assert "test_interpreter.py" in msg and "user_fn" in msg
    assert isinstance(ei.value.__cause__, ZeroDivisionError)


def test_rule_with_wrong_arity_is_reported():
    t = RuleTable("arity")
    t.register("sin")(lambda rw, eqn: [eqn.invars[0], eqn.invars[0]])
    with pytest.raises(Exception, match="arity.*returned 2 atoms for 1 outputs"):
        rewrite(jax.make_jaxpr(jnp.sin)(V), t)


def test_unknown_primitive_skips_rules_and_is_counted():
    assert unknown_p.name not in ir.known_primitives()
    called = []
    t = RuleTable("spy", default=lambda rw, eqn: called.append(eqn.primitive.name))
    cj = jax.make_jaxpr(lambda x: unknown_p.bind(jnp.sin(x)) +
                        jax.jit(lambda a: unknown_p.bind(a))(x))(V)
    stats = Stats()
    out = rewrite(cj, t, stats)
    assert unknown_p.name not in called
    assert stats.unknown[unknown_p.name] == 2  # nested occurrence counted too
    assert out is cj


@pytest.mark.parametrize("pname", ["dce", "fold", "cse", "simplify", "prune"])
def test_unknown_primitive_survives_every_pass(pname):
    def f(x):
        unknown_p.bind(x)                                # dead, top level
        jax.jit(lambda a: unknown_p.bind(a) + 1.0)(x)    # dead, inside a jit
        y = unknown_p.bind(x) * 1.0
        return y + unknown_p.bind(x) * 1.0               # two identical: never merged
    cj = jax.make_jaxpr(f)(V)
    cur = cj
    unknown = Stats().unknown
    for p in resolve(pname):
        r = p(cur, PassContext())
        ir.check(r.jaxpr)
        unknown.update(r.stats.unknown)
        cur = r.jaxpr
    assert ir.primitive_counts(cur)[unknown_p.name] == 4
    assert unknown[unknown_p.name] >= 4
    np.testing.assert_allclose(ir.eval_jaxpr(cur, V)[0], ir.eval_jaxpr(cj, V)[0])


def test_unknown_primitive_in_report():
    f = graphopt.optimize(lambda x: unknown_p.bind(x) * 1.0 + 0.0)
    np.testing.assert_allclose(f(V), V * 3.0, rtol=1e-6)
    rep = f.report(V)
    assert rep.unknown_primitives()[unknown_p.name] >= 1
    assert unknown_p.name in str(rep) and unknown_p.name in rep._repr_html_()
    assert ir.primitive_counts(f.jaxpr(V))[unknown_p.name] == 1


def test_register_known_primitive_lets_passes_touch_it():
    p = Primitive("graphopt_test_declared_pure")
    p.def_impl(lambda x: x + 1.0)
    p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
    mlir.register_lowering(p, mlir.lower_fun(lambda x: x + 1.0, multiple_results=False))
    cj = jax.make_jaxpr(lambda x: (p.bind(x), x)[1])(V)
    assert not resolve("dce")[0](cj, PassContext()).changed
    ir.register_known_primitive(p.name)
    assert resolve("dce")[0](cj, PassContext()).changed


# ---------------------------------------------------------------------- ir graph view

def test_graph_view_producers_users_lines():
    def f(x):
        a = jnp.sin(x)
        b = a * a
        return b + a, a
    cj = jax.make_jaxpr(f)(V)
    g = ir.Graph(cj)
    a = cj.jaxpr.eqns[0].outvars[0]
    assert g.producer_eqn(a).primitive.name == "sin"
    assert [e.primitive.name for e in g.user_eqns(a)] == ["mul", "mul", "add"]
    assert g.n_uses(a) == 4  # mul twice, add once, one output
    assert g.producer_eqn(cj.jaxpr.invars[0]) is None
    assert list(g.order) == list(range(len(cj.jaxpr.eqns)))
    assert "test_interpreter.py" in g.source_line(0)


def test_walk_eqns_weights_and_counts():
    def f(xs):
        return lax.scan(lambda c, x: (c + jnp.sin(x), None), 0.0, xs)[0]
    cj = jax.make_jaxpr(f)(V)
    w = {e.primitive.name: (wt, d) for e, wt, d in ir.walk_eqns(cj)}
    assert w["scan"] == (1.0, 0) and w["sin"] == (4.0, 1)
    body = cj.jaxpr.eqns[0].params["jaxpr"].jaxpr
    assert ir.count_eqns(cj) == ir.count_eqns(cj, nested=False) + len(body.eqns)
    assert ir.primitive_counts(cj)["sin"] == 1


def test_stats_merge_and_dict():
    a, b = Stats(), Stats()
    a.hit("x")
    b.hit("x", 2)
    b.unknown["p"] += 1
    b.note("n")
    b.note("n")
    a.merge(b)
    assert a.as_dict() == {"hits": {"x": 3}, "unknown": {"p": 1}, "notes": ["n"]}


def _template():
    """A traced one-in one-out jaxpr whose debug info hand-built jaxprs reuse."""
    return jax.make_jaxpr(lambda x: x)(1.0).jaxpr


def test_shared_sub_jaxpr_is_rewritten_once_and_stays_shared():
    layer = jax.jit(lambda x: x * 2.0 * 1.0)  # one traced body, called twice

    def f(x):
        return layer(layer(x))
    cj = jax.make_jaxpr(f)(V)
    a, b = (e.params["jaxpr"] for e in cj.jaxpr.eqns)
    assert a is b
    res = resolve("simplify")[0](cj, PassContext())
    a2, b2 = (e.params["jaxpr"] for e in res.jaxpr.jaxpr.eqns)
    assert a2 is b2 and a2 is not a
    assert res.stats.hits["simplify.mul_one"] == 1
    np.testing.assert_array_equal(ir.eval_jaxpr(res.jaxpr, V)[0], f(V))
