"""The optimize decorator: composition with jit/grad/vmap in every order, static
arguments, caching per abstract signature, reports, checks, bad input and the zoo."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt import ir, testing
from graphopt.errors import EquivalenceError, GraphoptError, PassError, RewriteError
from graphopt.interpreter import RuleTable, Stats, rewrite
from graphopt.models import ZOO
from graphopt.passes import PassResult

P = {"w": jnp.array([[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6]], jnp.float32),
     "b": jnp.array([0.01, -0.02], jnp.float32)}
XB = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3) / 10


def loss(p, x):
    h = jnp.tanh(x @ p["w"] * 1.0 + p["b"] + 0.0)
    dead = jnp.exp(h)  # noqa: F841
    return jnp.sum(h * h) + jnp.sum(h * h) * (jnp.float32(2.0) * 0.5)


def close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


O = graphopt.optimize
PB = (None, 0)  # vmap over examples, params shared
# (name, build(fn_is_optimized) -> function of (p, x)); the same composition of the
# plain loss is the reference.
COMPOSITIONS = {
    "opt": lambda f, o: o(f),
    "jit(opt)": lambda f, o: jax.jit(o(f)),
    "opt(jit)": lambda f, o: o(jax.jit(f)),
    "grad(opt)": lambda f, o: jax.grad(o(f)),
    "opt(grad)": lambda f, o: o(jax.grad(f)),
    "jit(grad(opt))": lambda f, o: jax.jit(jax.grad(o(f))),
    "opt(jit(grad))": lambda f, o: o(jax.jit(jax.grad(f))),
    "grad(jit(opt))": lambda f, o: jax.grad(jax.jit(o(f))),
    "vmap(opt)": lambda f, o: jax.vmap(o(f), in_axes=PB),
    "opt(vmap)": lambda f, o: o(jax.vmap(f, in_axes=PB)),
    "vmap(grad(opt))": lambda f, o: jax.vmap(jax.grad(o(f)), in_axes=PB),
    "opt(vmap(grad))": lambda f, o: o(jax.vmap(jax.grad(f), in_axes=PB)),
    "grad(opt(vmap))": lambda f, o: jax.grad(lambda p, x: o(jax.vmap(f, in_axes=PB))(p, x).sum()),
    "jit(vmap(opt(grad)))": lambda f, o: jax.jit(jax.vmap(o(jax.grad(f)), in_axes=PB)),
    "hessian(opt)": lambda f, o: jax.hessian(o(f), argnums=1),
    "jacfwd(opt)": lambda f, o: jax.jacfwd(o(f)),
    "opt(opt)": lambda f, o: o(o(f)),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_composition(name):
    build = COMPOSITIONS[name]
    want = build(loss, lambda f: f)(P, XB)
    got = build(loss, lambda f: O(f, check=True))(P, XB)
    close(got, want)


def test_decorator_with_and_without_arguments():
    @graphopt.optimize
    def f(x):
        return jnp.sin(x) * 1.0

    @graphopt.optimize(passes=["simplify"], check=True)
    def g(x):
        return jnp.sin(x) * 1.0
    close(f(XB), jnp.sin(XB))
    close(g(XB), jnp.sin(XB))
    assert g.report(XB).passes == ["simplify"]
    assert "mul" not in ir.primitive_counts(f.jaxpr(XB))
    assert "mul" in ir.primitive_counts(f.original_jaxpr(XB))
    assert f.__name__ == "f"


def test_pytrees_and_kwargs():
    def f(p, x, *, scale):
        return {"out": (p["w"] * scale, x + 0.0)}
    o = graphopt.optimize(f)
    close(o(P, XB, scale=jnp.float32(2.0)), f(P, XB, scale=jnp.float32(2.0)))


def test_report_and_lower():
    o = graphopt.optimize(loss)
    rep = o.report(P, XB)
    assert rep.eqns_after < rep.eqns_before
    hits = rep.hits()
    for h in ("simplify.mul_one", "simplify.add_zero", "fold.mul", "cse.mul", "dce.eqn"):
        assert hits[h] >= 1, h
    text, html = str(rep), rep._repr_html_()
    for name in ("fold", "simplify", "cse", "dce"):
        assert name in text and name in html
    assert rep.placement == "pre-AD"
    assert "stablehlo" in o.lower(P, XB).as_text() or o.lower(P, XB).as_text()


# ----------------------------------------------------------------- static and caching

def _static_f(traces):
    def f(x, mode, k=1):
        traces.append((mode, k))
        return jnp.sin(x) * k if mode == "sin" else jnp.cos(x) * k
    return f


def _check_static(o, f, traces, call):
    traces.clear()
    close(call(o, XB, "sin", 2), call(f, XB, "sin", 2))
    n = len(traces)
    close(call(o, XB + 1, "sin", 2), call(f, XB + 1, "sin", 2))  # same signature: cached
    assert len(traces) == n + 1  # only the reference call traced again
    close(call(o, XB, "cos", 2), call(f, XB, "cos", 2))
    close(call(o, XB, "cos", 3), call(f, XB, "cos", 3))
    assert sorted(set(traces)) == [("cos", 2), ("cos", 3), ("sin", 2)]
    assert traces.count(("cos", 3)) == 2  # a new static value: one graphopt trace


POSITIONAL = lambda fn, x, m, k: fn(x, m, k)
KEYWORD = lambda fn, x, m, k: fn(x, mode=m, k=k)


@pytest.mark.parametrize("kind,call", [
    ("argnums", POSITIONAL), ("argnames", KEYWORD), ("both", lambda fn, x, m, k: fn(x, m, k=k)),
], ids=["argnums-positional", "argnames-keyword", "argnums+argnames"])
def test_static_args_retrace_per_value(kind, call):
    traces = []
    f = _static_f(traces)
    kw = {"argnums": dict(static_argnums=(1, 2)), "argnames": dict(static_argnames=("mode", "k")),
          "both": dict(static_argnums=1, static_argnames="k")}[kind]
    _check_static(graphopt.optimize(f, **kw), f, traces, call)


@pytest.mark.parametrize("kind,call", [("argnames", POSITIONAL), ("argnums", KEYWORD)],
                         ids=["argnames-positional", "argnums-keyword"])
def test_static_args_passed_the_other_way(kind, call):
    traces = []
    f = _static_f(traces)
    kw = {"argnums": dict(static_argnums=(1, 2)), "argnames": dict(static_argnames=("mode", "k"))}[kind]
    _check_static(graphopt.optimize(f, **kw), f, traces, call)


def test_cache_per_abstract_signature():
    traces = [0]

    def f(x):
        traces[0] += 1
        return jnp.tanh(x) * 1.0
    o = graphopt.optimize(f)
    o(XB)
    o(XB * 2)
    o(np.asarray(XB))          # numpy array of the same shape/dtype
    jax.grad(lambda x: o(x).sum())(XB)  # same avals under a transform
    jax.jit(o)(XB)
    assert traces[0] == 1
    o(XB[:2])                  # new shape
    o(XB.astype(jnp.bfloat16))  # new dtype
    assert traces[0] == 3
    o(1.0)
    o(2.0)                      # weak-typed scalar, same signature
    assert traces[0] == 4


# ---------------------------------------------------------------------- bad input

def test_unknown_pass_lists_valid_ones():
    with pytest.raises(ValueError) as ei:
        graphopt.optimize(loss, passes=["prune", "no_such_pass"])
    msg = str(ei.value)
    assert "no_such_pass" in msg
    for name in ("dce", "fold", "cse", "simplify", "prune"):
        assert name in msg
    with pytest.raises(ValueError, match="no_such_pass"):
        graphopt.optimize(passes="no_such_pass")


@pytest.mark.parametrize("args,where", [
    (("not an array",), "x"),
    (({"a": XB, "b": "str"},), "['b']"),
    (([XB, object()],), "[1]"),
])
def test_non_array_argument_names_it(args, where):
    def f(x):
        return x
    with pytest.raises(TypeError) as ei:
        graphopt.optimize(f)(*args)
    msg = str(ei.value)
    assert "graphopt.optimize(f)" in msg and where in msg and "static" in msg


def test_wrong_call_and_unhashable_static_are_graphopt_errors():
    o = graphopt.optimize(lambda x: x)
    with pytest.raises(TypeError, match="graphopt.optimize"):
        o(XB, XB)
    o2 = graphopt.optimize(lambda x, cfg: x, static_argnames="cfg")
    with pytest.raises(TypeError, match="hashable"):
        o2(XB, {"a": 1})


def _table_pass(table_name, prim, rule):
    t = RuleTable(table_name)
    t.register(prim)(rule)

    def p(cj, ctx):
        st = Stats()
        out = rewrite(cj, t, st)
        return PassResult(out, out is not cj, st)
    p.__name__ = table_name
    return p


def test_check_catches_a_wrong_pass():
    wrong = _table_pass("wrong", "sin", lambda rw, eqn: rw.bind(jnp.cos, eqn.invars[0]))
    with pytest.raises(EquivalenceError, match="differs from the original"):
        graphopt.optimize(jnp.sin, passes=[wrong], check=True)(XB)
    # without check the wrong result goes through: check is what catches it
    assert not np.allclose(graphopt.optimize(jnp.sin, passes=[wrong])(XB), jnp.sin(XB))
    # under a transform the check runs on random inputs of the same types
    with pytest.raises(EquivalenceError):
        jax.jit(graphopt.optimize(jnp.sin, passes=[wrong], check=True))(XB)


def test_failing_rule_names_table_primitive_and_line():
    def boom(rw, eqn):
        raise ZeroDivisionError("boom")
    broken = _table_pass("broken_rules", "sin", boom)

    def user_fn(x):
        return jnp.sin(x)
    with pytest.raises(RewriteError) as ei:
        graphopt.optimize(user_fn, passes=[broken])(XB)
    msg = str(ei.value)
    assert "broken_rules" in msg and "'sin'" in msg and "test_api.py" in msg


def test_pass_that_raises_or_breaks_the_interface_is_named():
    def raising(cj, ctx):
        raise KeyError("oops")
    with pytest.raises(PassError, match="'raising'.*KeyError"):
        graphopt.optimize(jnp.sin, passes=[raising])(XB)
    shrink = _table_pass("shrink", "sin", lambda rw, eqn: rw.bind(jnp.sum, eqn.invars[0]))
    with pytest.raises(PassError, match="'shrink' changed the outputs"):
        graphopt.optimize(jnp.sin, passes=[shrink])(XB)

    def ill_typed(cj, ctx):
        j = cj.jaxpr
        e = j.eqns[0]
        bad = e.replace(outvars=[ir.new_var(ir.ShapedArray((7,), jnp.float32))])
        out = ir.closed(ir.make_jaxpr_from(j, eqns=[bad] + list(j.eqns[1:])), cj.consts)
        return PassResult(out, True)
    with pytest.raises(PassError, match="'ill_typed' produced an ill-typed jaxpr"):
        graphopt.optimize(jnp.sin, passes=[ill_typed])(XB)


def test_every_error_is_a_graphopt_error_or_names_graphopt():
    cases = [
        lambda: graphopt.optimize(jnp.sin, passes=[lambda cj, ctx: 1 / 0])(XB),
        lambda: graphopt.optimize(jnp.sin)("x"),
        lambda: graphopt.optimize(jnp.sin, passes=["nope"]),
        lambda: graphopt.optimize(3),
    ]
    for case in cases:
        with pytest.raises(Exception) as ei:
            case()
        e = ei.value
        assert isinstance(e, GraphoptError) or "graphopt" in str(e) or "pass" in str(e), e


def test_tracing_error_of_user_function_gets_a_graphopt_note():
    def user_fn(x):
        return x @ jnp.ones((5, 5))
    with pytest.raises(Exception) as ei:
        graphopt.optimize(user_fn)(XB)
    text = str(ei.value) + " ".join(getattr(ei.value, "__notes__", []))
    assert "graphopt" in text and "user_fn" in text


# ---------------------------------------------------------------------------- zoo

def _zoo_inputs(mod):
    """Random (params, opt_state, batch) of the model's tiny shapes, built without running
    its initializers eagerly (op-by-op random init costs seconds per model on CPU)."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    shapes = jax.eval_shape(lambda k: mod.init(k, **mod.SIZES), key)
    batch = jax.eval_shape(lambda k: mod.example_batch(k, **mod.SIZES), key)
    state = jax.eval_shape(mod.init_opt_state, shapes)

    def fill(tree, seed):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        vals = testing.random_like(leaves, seed)  # ints are 0/1: valid labels and tokens
        # positive floats keep variances and Adam's second moments meaningful
        vals = [jnp.abs(v) * 0.5 if jnp.issubdtype(v.dtype, jnp.floating) else v for v in vals]
        return jax.tree_util.tree_unflatten(treedef, vals)
    return fill(shapes, 0), fill(state, 1), fill(batch, 2)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_train_step(name):
    mod = ZOO[name]
    params, state, batch = _zoo_inputs(mod)
    opt = graphopt.optimize(mod.train_step)
    got = opt(params, state, batch)
    want = jax.jit(mod.train_step)(params, state, batch)
    close(got, want, rtol=2e-5)  # (params, opt_state, loss)
    rep = opt.report(params, state, batch)
    assert rep.placement == "post-AD"
    assert rep.eqns_after < rep.eqns_before
    assert not rep.unknown_primitives()
