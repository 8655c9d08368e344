"""Tests of the pruning family (transforms/prune.py, prune_simplify.py): one test per rule,
negative tests for the identities that would change NaN/Inf behaviour, the folding size cap, DCE of
higher-order primitives, CSE's refusal to merge random/effectful/unknown equations,
idempotence and ``check_jaxpr`` after every pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from graphopt import ir, testing
from graphopt.transforms import prune

X = jnp.array([[0.5, -1.5, 2.0], [3.0, -0.25, 1.0]], jnp.float32)
V = jnp.array([0.3, -1.2, 2.5], jnp.float32)


def jaxpr_of(f, *args):
    return jax.make_jaxpr(f)(*args)


def prims(cj):
    return ir.primitive_counts(cj)


def one_eqn(prim, params, x, out_aval=None):
    """A closed jaxpr ``x -> prim(x)`` built by hand: JAX's own wrappers (and even some
    ``bind``s) skip no-op converts/broadcasts, so the rules for them need this."""
    a = ir.new_var(ir.aval_of(x))
    b = ir.new_var(out_aval or ir.aval_of(x))
    eqn = ir.new_eqn([a], [b], prim, params, source_info=_source_info())
    return ir.closed(ir.make_jaxpr_from(_template(), invars=[a], outvars=[b], eqns=[eqn]), [])


def _source_info():
    cj = jax.make_jaxpr(jnp.sin)(1.0)
    return cj.jaxpr.eqns[0].source_info


# ============================================================ simplify: one per rule

# (rule hit, function, args, primitive that must shrink)
SIMPLIFY_CASES = [
    ("mul_one", lambda x: x * 1.0, (X,), "mul"),
    ("mul_one", lambda x: 1.0 * x, (X,), "mul"),
    ("mul_one", lambda x: x * jnp.ones_like(x), (X,), "mul"),  # broadcast of a literal 1
    ("add_zero", lambda x: x + 0.0, (X,), "add"),
    ("add_zero", lambda x: 0.0 + x, (X,), "add"),
    ("add_zero", lambda x: x + jnp.zeros_like(x), (X,), "add"),
    ("sub_zero", lambda x: x - 0.0, (X,), "sub"),
    ("div_one", lambda x: x / 1.0, (X,), "div"),
    ("div_one", lambda i: lax.div(i, jnp.int32(1)), (jnp.arange(6, dtype=jnp.int32),), "div"),
    ("pow_one", lambda x: lax.integer_pow(x, 1), (X,), "integer_pow"),
    ("neg_neg", lambda x: -(-x), (X,), "neg"),
    ("max_self", lambda i: jnp.maximum(i, i), (jnp.arange(6, dtype=jnp.int32),), "max"),
    ("min_self", lambda i: jnp.minimum(i, i), (jnp.arange(6, dtype=jnp.int32),), "min"),
    ("and_self", lambda b: b & b, (X > 0,), "and"),
    ("or_self", lambda b: b | b, (X > 0,), "or"),
    ("transpose_transpose", lambda x: x.T.T, (X,), "transpose"),
    ("transpose_transpose",
     lambda x: jnp.transpose(jnp.transpose(x.reshape(1, 2, 3), (1, 2, 0)), (1, 0, 2)),
     (X,), "transpose"),
    ("transpose_identity", lambda x: lax.transpose_p.bind(x, permutation=(0, 1)), (X,),
     "transpose"),
    ("reshape_reshape", lambda x: x.reshape(3, 2).reshape(6), (X,), "reshape"),
    ("reshape_noop",
     lambda x: lax.reshape_p.bind(x, new_sizes=(2, 3), dimensions=None, sharding=None),
     (X,), "reshape"),
    ("squeeze_noop", lambda x: lax.squeeze_p.bind(x, dimensions=()), (X,), "squeeze"),
    ("reduce_noop", lambda x: jnp.sum(x, axis=()), (X,), "reduce_sum"),
    ("reduce_noop", lambda i: jnp.max(i, axis=()), (jnp.arange(6, dtype=jnp.int32),),
     "reduce_max"),
    ("reduce_noop", lambda i: jnp.min(i, axis=()), (jnp.arange(6, dtype=jnp.int32),),
     "reduce_min"),
    ("reduce_noop", lambda x: jnp.prod(x, axis=()), (X,), "reduce_prod"),
    ("select_same", lambda x: lax.select(x > 0, x, x), (X,), "select_n"),
    ("select_const", lambda x: lax.select(True, x, x * 2.0), (X,), "select_n"),
    ("select_const", lambda x: lax.select(jnp.zeros(x.shape, bool), x * 2.0, x), (X,),
     "select_n"),
    ("concat_single", lambda x: lax.concatenate_p.bind(x, dimension=0), (X,), "concatenate"),
    ("slice_full", lambda x: lax.slice(x, (0, 0), (2, 3)), (X,), "slice"),
]


@pytest.mark.parametrize("rule,f,args,prim", SIMPLIFY_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(SIMPLIFY_CASES)])
def test_simplify_rule(rule, f, args, prim):
    # outputs, grads, idempotence, check_jaxpr; dce drops what a chain rule bypassed
    res = testing.check_pass(["simplify", "dce"], f, *args)
    assert res.stats.hits[f"simplify.{rule}"] >= 1, res.stats.hits
    assert prims(res.jaxpr).get(prim, 0) < prims(res.before).get(prim, 0), res.jaxpr


@pytest.mark.parametrize("f", [lambda x: jnp.maximum(x, x), lambda x: jnp.minimum(x, x),
                               lambda x: jnp.max(x, axis=()), lambda x: jnp.min(x, axis=())])
def test_simplify_keeps_float_max_of_itself(f):
    # The value is x, but JAX's derivative of a max/min at NaN is 0 or NaN where x's is 1.
    x = jnp.array([1.0, jnp.nan, 2.0])
    assert not np.allclose(jax.grad(lambda v: f(v).sum())(x), 1.0)
    res = testing.check_pass("simplify", f, x, expect_change=False)
    assert not res.stats.hits, res.stats.hits
    assert ir.count_eqns(res.jaxpr) == ir.count_eqns(res.before)


@pytest.mark.parametrize("rule,prim,params,x,out", [
    ("convert_noop", lax.convert_element_type_p,
     dict(new_dtype=np.dtype("float32"), weak_type=False, sharding=None), X, None),
    ("broadcast_noop", lax.broadcast_in_dim_p,
     dict(shape=(2, 3), broadcast_dimensions=(0, 1), sharding=None), X, None),
])
def test_simplify_rule_hand_built(rule, prim, params, x, out):
    # JAX never emits these no-ops itself, but other passes can leave them behind.
    res = testing.check_pass("simplify", one_eqn(prim, params, x, out), x)  # idempotent too
    assert res.stats.hits[f"simplify.{rule}"] == 1
    assert ir.count_eqns(res.jaxpr) == 0
    np.testing.assert_array_equal(ir.eval_jaxpr(res.jaxpr, x)[0], x)


def test_simplify_add_any_zero():
    # add_any (AD's accumulation) only appears in differentiated programs.
    g = jax.make_jaxpr(jax.grad(lambda x: jnp.sin(x) * x))(1.0)
    add_any = next(e.primitive for e in g.jaxpr.eqns if e.primitive.name == "add_any")
    v = V[1]  # a scalar: add_any's operands have one shape, and a literal is a scalar
    a, b = ir.new_var(ir.aval_of(v)), ir.new_var(ir.aval_of(v))
    zero = ir.literal(np.float32(0.0))
    eqn = ir.new_eqn([zero, a], [b], add_any, {}, source_info=_source_info())
    cj = ir.closed(ir.make_jaxpr_from(_template(), invars=[a], outvars=[b], eqns=[eqn]), [])
    res = testing.check_pass("simplify", cj, v)
    assert res.stats.hits["simplify.add_zero"] == 1 and ir.count_eqns(res.jaxpr) == 0
    np.testing.assert_array_equal(ir.eval_jaxpr(res.jaxpr, v)[0], v)


def test_transpose_chain_composes_non_identity():
    f = lambda x: jnp.transpose(jnp.transpose(x, (1, 2, 0)), (1, 2, 0))
    x = jnp.arange(24.0).reshape(2, 3, 4)
    res = testing.check_pass(["simplify", "dce"], f, x)
    assert prims(res.jaxpr)["transpose"] == 1
    assert res.stats.hits["simplify.transpose_transpose"] == 1


def test_convert_to_other_dtype_is_kept():
    res = testing.check_pass("simplify", lambda x: x.astype(jnp.float16).astype(jnp.float32), X,
                             expect_change=False)
    assert not res.changed  # the round trip rounds: not an identity


# ================================================= simplify: rules that must NOT fire

NAN_INF = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0, -0.0, 1.0], jnp.float32)


@pytest.mark.parametrize("f", [
    lambda x: x * 0.0,
    lambda x: 0.0 * x,
    lambda x: x * jnp.zeros_like(x),
    lambda x: x - x,
    lambda x: x / x,
    lambda x: x + jnp.nan,                       # NaN is no identity element
    lambda x: x * jnp.nan,
    lambda x: jnp.maximum(x, -x),
], ids=["x*0", "0*x", "x*zeros", "x-x", "x/x", "x+nan", "x*nan", "max(x,-x)"])
def test_nan_inf_changing_identities_do_not_fire(f):
    for name in ("simplify", "prune"):
        res = testing.check_pass(name, f, NAN_INF, expect_change=False)
        np.testing.assert_array_equal(ir.eval_jaxpr(res.jaxpr, NAN_INF)[0],
                                      ir.eval_jaxpr(res.before, NAN_INF)[0])
        assert name != "simplify" or not res.stats.hits, res.stats.hits


def test_x_times_zero_keeps_nan_through_optimize():
    import graphopt
    f = lambda x: x * 0.0 + 1.0
    out = graphopt.optimize(f)(NAN_INF)
    np.testing.assert_array_equal(out, f(NAN_INF))
    assert np.isnan(out[0]) and np.isnan(out[1])


def test_identity_with_shape_change_is_not_applied():
    # v * ones((2,3)) broadcasts v: the product is not v itself.
    f = lambda v: lax.mul(lax.broadcast_in_dim(v, (2, 3), (1,)), jnp.ones((2, 3)))
    res = testing.check_pass("prune", f, V)
    assert res.jaxpr.out_avals[0].shape == (2, 3)


def test_select_on_varying_predicate_is_kept():
    res = testing.check_pass("simplify", lambda x: jnp.where(x > 0, x, 2.0 * x), X,
                             expect_change=False)
    assert "select_n" in prims(res.jaxpr)


# ============================================================== constant folding

def test_fold_scalar_chain_becomes_literal():
    f = lambda x: x * (jnp.float32(2.0) * 3.0 + 1.0)
    res = testing.check_pass("fold", f, X)
    assert res.stats.hits["fold.mul"] >= 1 and res.stats.hits["fold.add"] >= 1
    assert prims(res.jaxpr) == {"mul": 1}
    (lit,) = [a for a in res.jaxpr.jaxpr.eqns[0].invars if ir.is_literal(a)]
    assert float(ir.literal_value(lit)) == 7.0


def test_fold_small_array_constant():
    f = lambda x: x + jnp.arange(3.0) * 2.0 + jnp.sqrt(jnp.arange(3.0))
    res = testing.check_pass(["fold", "dce"], f, X)
    assert res.stats.hits["fold.mul"] == 1 and res.stats.hits["fold.sqrt"] == 1
    assert "sqrt" not in prims(res.jaxpr) and "iota" not in prims(res.jaxpr)
    assert sum(np.asarray(c).nbytes for c in res.jaxpr.consts) <= 2 * 12


def test_fold_division_through_xla():
    f = lambda x: x * (jnp.float32(1.0) / 3.0) + jnp.exp(jnp.float32(0.5))
    res = testing.check_pass("fold", f, X)
    assert res.stats.hits["fold.div"] == 1 and res.stats.hits["fold.exp"] == 1


@pytest.mark.parametrize("make", [
    lambda: jnp.ones((1024, 1024)) * 2.0,
    lambda: jnp.full((1024, 1024), 3.0) + jnp.ones((1024, 1024)),
    lambda: jnp.broadcast_to(jnp.arange(1024.0), (1024, 1024)) * 2.0,
], ids=["ones*2", "full+ones", "iota-broadcast*2"])
def test_fold_never_materializes_a_large_constant(make):
    f = lambda x: x * make()
    x = jnp.ones((1024, 1024), jnp.float32)
    for name in ("fold", "prune"):
        res = testing.check_pass(name, f, x, expect_change=False)
        total = sum(np.asarray(c).nbytes for c in res.jaxpr.consts)
        assert total <= prune.FOLD_MAX_BYTES, f"{name} materialized {total} bytes"
        # The big value stays a cheap broadcast (of the original or a folded scalar).
        assert prims(res.jaxpr).get("broadcast_in_dim", 0) >= 1
    np.testing.assert_array_equal(jax.jit(lambda x: ir.eval_jaxpr(res.jaxpr, x))(x)[0], f(x))


def test_fold_respects_fold_max_bytes_option():
    f = lambda x: x + jnp.arange(16.0).reshape(4, 4) * 2.0
    x = jnp.ones((4, 4))
    small = testing.check_pass("fold", f, x, options={"fold_max_bytes": 32}, expect_change=False)
    assert not small.stats.hits and not small.changed
    big = testing.check_pass("fold", f, x, options={"fold_max_bytes": 1 << 20})
    assert big.stats.hits["fold.mul"] == 1


def test_fold_never_runs_random_or_effects():
    def f(x):
        k = jax.random.key(0)  # constant key: random ops have all-constant inputs
        r = jax.random.bits(k, (3,))
        jax.debug.callback(lambda v: None, jnp.float32(2.0) * 3.0)
        return x + r.astype(jnp.float32)
    res = testing.check_pass("fold", f, V, expect_change=False)
    for name in ("random_seed", "random_bits", "debug_callback"):
        assert prims(res.jaxpr).get(name, 0) == prims(res.before).get(name, 0), name
    assert not any(k.startswith("fold.random") for k in res.stats.hits)


@pytest.mark.parametrize("f,arg", [
    (lambda i: i + jnp.int32(2**30) * 4, jnp.int32(1)),           # integer wrap-around
    (lambda x: x + jnp.maximum(jnp.float32(jnp.nan), 1.0), jnp.float32(1)),
    (lambda x: x + jnp.float32(1.0) / 0.0, jnp.float32(1)),
    (lambda i: i + lax.div(jnp.int32(7), jnp.int32(-2)) + lax.rem(jnp.int32(-7), jnp.int32(2)),
     jnp.int32(1)),
    (lambda x: x * (jnp.float32(-0.0) + 0.0), jnp.float32(-1)),
    (lambda b: b | (jnp.int32(3) > 2), jnp.bool_(False)),
], ids=["int-wrap", "nan-max", "inf", "int-div", "signed-zero", "bool"])
def test_folded_values_match_xla(f, arg):
    res = testing.check_pass("fold", f, arg)  # and changed
    np.testing.assert_array_equal(ir.eval_jaxpr(res.jaxpr, arg)[0], jax.jit(f)(arg))


def test_fold_inside_scan_body():
    def f(xs):
        return lax.scan(lambda c, x: (c + x * (jnp.float32(2.0) * 3.0), None), 0.0, xs)[0]
    res = testing.check_pass("fold", f, V)
    assert res.stats.hits["fold.mul"] == 1


# ========================================================================== CSE

def test_cse_merges_duplicates():
    f = lambda x: jnp.sin(x) * jnp.exp(x) + jnp.sin(x) * jnp.exp(x)
    res = testing.check_pass(["cse", "dce"], f, X)
    assert res.stats.hits["cse.sin"] == 1 and res.stats.hits["cse.mul"] == 1
    assert prims(res.jaxpr) == {"sin": 1, "exp": 1, "mul": 1, "add": 1}


def test_cse_inside_sub_jaxprs():
    def f(xs):
        return lax.scan(lambda c, x: (c + jnp.sin(x) + jnp.sin(x), None), 0.0, xs)[0]
    res = testing.check_pass("cse", f, V)
    assert res.stats.hits["cse.sin"] == 1


def test_cse_respects_params_and_literals():
    f = lambda x: (jnp.sum(x, 0), jnp.sum(x, 1), x * 0.0, x * -0.0)
    res = testing.check_pass("cse", f, X, expect_change=False)
    assert not res.changed  # different axes; +0.0 and -0.0 give different signs


def test_cse_never_merges_random():
    def f(key_data):
        k = jax.random.wrap_key_data(key_data)
        return jax.random.bits(k, (3,)) + jax.random.bits(k, (3,))
    kd = jax.random.key_data(jax.random.key(1))
    res = testing.check_pass("cse", f, kd, expect_change=False)
    assert prims(res.jaxpr)["random_bits"] == 2 and not res.changed


def test_cse_never_merges_calls_holding_random():
    # Typed keys reach jax.random.normal's inner jit directly: the two calls look equal.
    def f(k):
        return jax.random.normal(k, (3,)) + jax.random.normal(k, (3,))
    res = testing.check_pass("cse", f, jax.random.key(0), expect_change=False)
    assert prims(res.jaxpr)["random_bits"] == prims(res.before)["random_bits"] == 2
    assert not res.changed


def test_cse_never_merges_effects():
    calls = []

    def f(x):
        jax.debug.callback(lambda v: calls.append(1), x)
        jax.debug.callback(lambda v: calls.append(1), x)
        return x
    res = testing.check_pass("cse", f, V, expect_change=False)
    assert prims(res.jaxpr)["debug_callback"] == 2


def test_cse_does_not_map_to_a_dropped_output():
    # `_ = sin a; b = sin a`: the read `b` must not be replaced by the dropped `_`.
    cj = jaxpr_of(lambda a: (jnp.sin(a), jnp.sin(a)), V)
    e0, e1 = cj.jaxpr.eqns
    e0 = e0.replace(outvars=[ir.DropVar(e0.outvars[0].aval)])
    cj = ir.closed(ir.make_jaxpr_from(cj.jaxpr, eqns=[e0, e1], outvars=[e1.outvars[0]]), [])
    res = testing.check_pass("cse", cj, V, expect_change=False)
    np.testing.assert_allclose(ir.eval_jaxpr(res.jaxpr, V)[0], np.sin(V), rtol=1e-6)


# ========================================================================== DCE

def test_dce_drops_dead_equations_and_consts():
    big = np.arange(12.0, dtype=np.float32).reshape(4, 3)

    def f(x):
        _ = jnp.exp(x) * 3.0
        _ = x @ big.T  # closed-over constant only a dead equation reads
        return jnp.sin(x)
    res = testing.check_pass("dce", f, V)
    assert res.before.consts
    assert res.stats.hits["dce.eqn"] >= 2 and res.stats.hits["dce.const"] == 1
    assert prims(res.jaxpr) == {"sin": 1} and not res.jaxpr.consts


def test_dce_cond_outputs():
    f = lambda p, x: lax.cond(p, lambda x: (jnp.sin(x), jnp.cos(x)),
                              lambda x: (x, x * 2.0), x)[0]
    for p in (True, False):
        res = testing.check_pass("dce", f, p, V)
        assert res.stats.hits["dce.cond_outputs"] == 1
        assert "cos" not in prims(res.jaxpr)


def test_dce_scan_outputs_and_carries():
    def f(xs):
        def body(c, x):
            a, b = c
            return (a + x, b * jnp.exp(x)), (jnp.sin(x), jnp.cos(x))
        (a, _), (ys, _) = lax.scan(body, (0.0, 1.0), xs)
        return a, ys
    res = testing.check_pass("dce", f, V)
    assert res.stats.hits["dce.scan_outputs"] == 2
    p = prims(res.jaxpr)
    assert "exp" not in p and "cos" not in p and p["sin"] == 1


def test_dce_while_carries():
    def f(x):
        def body(c):
            i, a, b, d = c
            return i + 1, a + 1.0, b * jnp.exp(a), d + b  # b, d dead; a needed
        return lax.while_loop(lambda c: c[0] < 3, body, (0, x, x, x))[1]
    res = testing.check_pass("dce", f, V, grads=False)  # and idempotent
    assert res.stats.hits["dce.while_carries"] == 2
    assert "exp" not in prims(res.jaxpr)
    (w,) = [e for e in res.jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    assert len(w.outvars) == 2  # the counter (read by the predicate) and a


def test_dce_while_keeps_carry_read_by_predicate_or_needed_carry():
    def f(x):
        def body(c):
            i, a, s = c
            return i + 1, a + s, s * 0.5  # s feeds a, i feeds the predicate
        return lax.while_loop(lambda c: c[0] < 4, body, (0, x, x))[1]
    res = testing.check_pass("dce", f, V, expect_change=False, grads=False)
    assert not res.changed


def test_dce_jit_custom_jvp_and_remat_outputs():
    @jax.custom_jvp
    def g(x):
        return jnp.sin(x), jnp.cos(x)

    @g.defjvp
    def g_jvp(p, t):
        return g(*p), (jnp.cos(p[0]) * t[0], -jnp.sin(p[0]) * t[0])

    def f(x):
        a = jax.jit(lambda x: (jnp.sin(x), jnp.tanh(x)))(x)[0]
        b = g(x)[0]
        c = jax.checkpoint(lambda x: (jnp.exp(x), jnp.log1p(x * x)))(x)[0]
        return a + b + c
    res = testing.check_pass("dce", f, V)
    h = res.stats.hits
    assert h["dce.jit_outputs"] == 1 and h["dce.custom_jvp_call_outputs"] == 1
    assert h["dce.remat2_outputs"] == 1
    p = prims(res.jaxpr)
    assert "tanh" not in p and "log1p" not in p


def test_dce_keeps_effects_and_random():
    def f(x, kd):
        jax.debug.callback(lambda v: None, x)
        jax.random.bits(jax.random.wrap_key_data(kd), (2,))  # dead but random
        return x * 2.0
    kd = jax.random.key_data(jax.random.key(0))
    res = testing.check_pass("dce", f, V, kd, expect_change=False)
    assert prims(res.jaxpr)["debug_callback"] == 1
    assert prims(res.jaxpr)["random_bits"] == 1


def test_dce_keeps_effects_in_loop_bodies():
    def f(xs):
        def body(c, x):
            jax.debug.callback(lambda v: None, x)
            return c, jnp.sin(x)
        return lax.scan(body, 0.0, xs)[0]
    res = testing.check_pass("dce", f, V)
    assert prims(res.jaxpr)["debug_callback"] == 1
    assert "sin" not in prims(res.jaxpr)


# ============================================= every pass: idempotent, well-typed

def _corpus():
    def loop(xs):
        def body(c, x):
            y = jnp.sin(x) * 1.0 + jnp.sin(x)
            return c + y + jnp.float32(2.0) * 3.0, (y, jnp.cos(x))
        return lax.scan(body, 0.0, xs)[0]

    def branchy(x):
        return lax.cond(x.sum() > 0, lambda x: -(-x) + 0.0, lambda x: x.T.T * 1.0, x)

    def mixed(x):
        d = jnp.exp(x)  # dead
        return jnp.tanh(x) + jnp.tanh(x) + jnp.sum(x, axis=())

    def grad_fn(x):
        return jax.grad(lambda x: jnp.sum(jnp.tanh(x) ** 2 * 1.0))(x)

    def deep(x):
        def wbody(c):
            i, v = c
            v = lax.scan(lambda a, b: (lax.cond(b > 0, lambda a: a * 1.0 + jnp.sin(b),
                                                lambda a: a - 0.0, a), None), v, x)[0]
            return i + 1, v
        return lax.while_loop(lambda c: c[0] < 2, wbody, (0, 0.0))[1]
    return {"loop": (loop, V), "branchy": (branchy, X), "mixed": (mixed, X),
            "grad": (grad_fn, X), "deep": (deep, V)}


CORPUS = _corpus()


@pytest.mark.parametrize("pname", ["dce", "fold", "cse", "simplify"])
@pytest.mark.parametrize("prog", sorted(CORPUS))
def test_each_pass_idempotent_and_checked(pname, prog):
    f, x = CORPUS[prog]
    # type-checked, idempotent (a second run returns its input), outputs and gradients kept
    testing.check_pass(pname, f, x, grads=prog != "deep", expect_change=False)


@pytest.mark.parametrize("prog", sorted(CORPUS))
def test_prune_group_on_corpus(prog):
    f, x = CORPUS[prog]
    testing.check_pass("prune", f, x, grads=prog != "deep")


def _template():
    """A traced one-in one-out jaxpr whose debug info hand-built jaxprs reuse."""
    return jax.make_jaxpr(lambda x: x)(1.0).jaxpr
