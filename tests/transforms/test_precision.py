"""The precision pass: casts where the policy says, float32 where it must, same training."""
import warnings

import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp
from jax import lax

import graphopt
from graphopt import ir, testing
from graphopt.models import cnn, gpt
from graphopt.transforms import precision as P

BF16 = np.dtype(jnp.bfloat16)
BF = {"precision": "bfloat16"}  # check_pass's options: bfloat16 compute, compared at its rtol


def _dots(cj):
    return [e for e, _, _ in ir.walk_eqns(cj)
            if e.primitive.name in ("dot_general", "conv_general_dilated")]


def _in_dtypes(cj, prim):
    return {np.dtype(a.aval.dtype) for e, _, _ in ir.walk_eqns(cj) if e.primitive.name == prim
            for a in e.invars if ir.is_var(a)}


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean(jax.nn.log_softmax(h @ params["w2"]))


def _mlp_args(key=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    return ({"w1": jax.random.normal(k1, (16, 32)) / 4, "b1": jnp.zeros(32),
             "w2": jax.random.normal(k2, (32, 8)) / 6}, jax.random.normal(k3, (4, 16)))


# ---------------------------------------------------------------- the rewrite itself

def test_dots_cast_deny_list_float32_and_interface_kept():
    params, x = _mlp_args()
    res = testing.check_pass(P.precision, _mlp, params, x, options=BF,
                             expect_change=False)
    assert res.changed
    assert all(np.dtype(a.aval.dtype) == BF16 for e in _dots(res.jaxpr) for a in e.invars[:2])
    assert not any(np.dtype(a.aval.dtype) == BF16 for e in _dots(res.before) for a in e.invars)
    for prim in ("exp", "log", "reduce_sum"):  # the deny list runs in float32
        got = _in_dtypes(res.jaxpr, prim)
        assert got and got <= {np.dtype(np.float32)}, (prim, got)
    assert [ir.aval_str(a) for a in res.jaxpr.out_avals] == \
        [ir.aval_str(a) for a in res.before.out_avals]
    d = res.stats.details["precision"]
    assert d["casts_added"] > 0 and d["low_precision_flop_share"] == 1.0


def test_idempotent_and_no_convert_chains():
    params, x = _mlp_args()

    def f(p, x):  # reshape/transpose between two dots: the cast slides past them
        h = (x @ p["w1"]).reshape(4, 4, 8).transpose(0, 2, 1).reshape(4, 32)
        return jnp.sum(jnp.exp(h @ p["w2"]))

    res = testing.check_pass(P.precision, f, params, x, options=BF)  # idempotent, equivalent
    for e, _, _ in ir.walk_eqns(res.jaxpr):
        if e.primitive.name == "convert_element_type" and ir.is_var(e.invars[0]):
            g = ir.Graph(res.jaxpr)
            prod = g.producer_eqn(e.invars[0])
            assert prod is None or prod.primitive.name != "convert_element_type", "convert chain"
    # the shape ops between the dots run on bfloat16 values
    assert BF16 in _in_dtypes(res.jaxpr, "transpose")


def test_integers_and_bools_never_cast():
    def f(a, b, m):
        c = a @ b + 3
        return jnp.where(m, c, 0).sum(), (a * 2).astype(jnp.float32) @ jnp.ones((8, 2))

    a = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)
    b = jnp.ones((8, 8), jnp.int32)
    m = jnp.ones((4, 8), bool)
    res = testing.check_pass(P.precision, f, a, b, m, options=BF,
                             expect_change=False)
    def non_float_converts(j):
        return sorted(str(e) for e, _, _ in ir.walk_eqns(j)
                      if e.primitive.name == "convert_element_type" and not all(
                          jnp.issubdtype(v.aval.dtype, jnp.floating) for v in e.invars + e.outvars))
    assert res.changed  # the float dot at the end is cast ...
    # ... nothing else
    assert len(non_float_converts(res.jaxpr)) == len(non_float_converts(res.before))
    int_dot = [e for e in _dots(res.jaxpr) if jnp.issubdtype(e.invars[0].aval.dtype, jnp.integer)]
    assert int_dot and all(a.aval.dtype == jnp.int32 for e in int_dot for a in e.invars)
    out0, out1 = ir.eval_jaxpr(res.jaxpr, a, b, m), ir.eval_jaxpr(res.before, a, b, m)
    assert int(out0[0]) == int(out1[0])


def _x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX
    return enable_x64()


def test_float64_only_when_asked():
    with _x64():
        w = jnp.ones((8, 8), jnp.float64)
        f = lambda w: jnp.sum(jnp.tanh(w @ w))  # noqa: E731
        res = testing.check_pass(P.precision, f, w, options=BF,
                                 expect_change=False)
        assert not res.changed and any("castable" in n for n in res.stats.notes)
        pol = graphopt.Precision("bfloat16", cast_float64=True)
        res = testing.check_pass(P.precision, f, w, options={"precision": pol})
        assert res.changed and all(a.aval.dtype == BF16 for e in _dots(res.jaxpr)
                                   for a in e.invars)
        assert res.jaxpr.out_avals[0].dtype == jnp.float64


def test_keep_float32_by_primitive_and_scope_and_unmatched_reported():
    def f(w, x):
        with jax.named_scope("router"):
            r = x @ w
        return jnp.sum(jnp.tanh(r @ w))

    w, x = jnp.ones((8, 8)) / 8, jnp.ones((4, 8))
    pol = graphopt.Precision("bfloat16", keep_float32=["router", "no_such_scope"])
    res = testing.check_pass(P.precision, f, w, x, options={"precision": pol},
                             expect_change=False)
    dts = [np.dtype(e.invars[0].aval.dtype) for e in _dots(res.jaxpr)]
    assert dts == [np.dtype(np.float32), BF16]
    assert any("no_such_scope" in n for n in res.stats.notes)
    assert not any("'router'" in n for n in res.stats.notes)
    pol = graphopt.Precision("bfloat16", keep_float32=["dot_general"])
    res = testing.check_pass(P.precision, f, w, x, options={"precision": pol}, expect_change=False)
    assert all(np.dtype(e.invars[0].aval.dtype) == np.float32 for e in _dots(res.jaxpr))


def test_bad_precision_values_error():
    with pytest.raises(graphopt.OptionError, match="'bfloat16', 'float16'"):
        graphopt.optimize(_mlp, precision="fp8")
    with pytest.raises(ValueError, match="compute must be one of"):
        graphopt.Precision("int8")
    with pytest.raises(ValueError, match="keep_float32"):
        graphopt.Precision("bfloat16", keep_float32=[3])


def test_control_flow_bodies_cast():
    def f(w, xs):
        def body(c, x):
            return jnp.tanh(c @ w + x), None
        c, _ = lax.scan(body, xs[0], xs)
        c = lax.cond(c.sum() > 0, lambda c: c @ w, lambda c: -c @ w, c)

        @jax.custom_vjp
        def g(c):
            return c @ w
        g.defvjp(lambda c: (c @ w, None), lambda _, ct: (ct @ w.T,))
        return jnp.sum(g(c) ** 2)

    w, xs = jax.random.normal(jax.random.PRNGKey(0), (8, 8)) / 3, jnp.ones((5, 4, 8)) / 5
    res = testing.check_pass(P.precision, f, w, xs, options=BF,
                             expect_change=False)
    assert _dots(res.jaxpr) and all(e.invars[0].aval.dtype == BF16 for e in _dots(res.jaxpr))


def test_unknown_primitive_passes_through_reported():
    prim = ir.Primitive("my_opaque_op")
    prim.def_impl(lambda x: x * 2)
    prim.def_abstract_eval(lambda x: x)
    jax.interpreters.mlir.register_lowering(
        prim, jax.interpreters.mlir.lower_fun(lambda x: x * 2, multiple_results=False))
    w = jnp.ones((8, 8))
    res = testing.check_pass(P.precision, lambda w: jnp.sum(prim.bind(w @ w)), w, options=BF,
                             expect_change=False)
    assert res.stats.unknown["my_opaque_op"] == 1
    opaque = [e for e, _, _ in ir.walk_eqns(res.jaxpr) if e.primitive is prim]
    assert opaque[0].invars[0].aval.dtype == jnp.float32  # fed in its own dtype


_OPS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "exp": jnp.exp, "square": jnp.square,
        "sum": lambda h: jnp.sum(h, axis=-1, keepdims=True) + h, "neg": lambda h: -h}


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 9), n=st.integers(1, 7),
       ops=st.lists(st.sampled_from(sorted(_OPS)), min_size=1, max_size=4))
def test_property_random_chains(m, k, n, ops):
    """Any chain of ops after a matmul: same interface, bf16 dot, outputs near float32,
    the deny-listed exp and sums in float32, idempotent."""
    def f(x, w, i):
        h = x @ w
        for o in ops:
            h = _OPS[o](h)
        return jnp.sum(h * 0.5, axis=0), i * 2

    x = jax.random.normal(jax.random.PRNGKey(m), (m, k)) / 3
    w = jax.random.normal(jax.random.PRNGKey(n), (k, n)) / 3
    i = jnp.arange(3)
    # check_pass: outputs and gradients within bfloat16's rtol, ints exact, idempotent
    res = testing.check_pass(P.precision, f, x, w, i, options=BF, expect_change=False)
    assert [ir.aval_str(a) for a in res.jaxpr.out_avals] == \
        [ir.aval_str(a) for a in res.before.out_avals]
    assert all(e.invars[0].aval.dtype == BF16 for e in _dots(res.jaxpr))
    for prim in ("exp", "reduce_sum"):
        assert _in_dtypes(res.jaxpr, prim) <= {np.dtype(np.float32)}


def test_relu_gradient_after_cast():
    # relu's custom_jvp body was re-typed to bfloat16 pre-AD while its jvp rule stays traced
    # for float32: jax.grad of the result failed ("lax.gt requires ... same dtypes")
    w = jnp.ones((3, 2)) / 3
    f = lambda x, w: jnp.sum(jax.nn.relu(x @ w))  # noqa: E731
    res = testing.check_pass(P.precision, f, jnp.ones((1, 3)), w, options=BF)
    assert res.stats.details["precision"]["casts_added"] >= 1
    g = jax.grad(graphopt.optimize(f, precision="bfloat16"), argnums=1)(jnp.ones((1, 3)), w)
    np.testing.assert_allclose(g, jax.grad(f, argnums=1)(jnp.ones((1, 3)), w), rtol=2e-2)


# ---------------------------------------------------------------- through optimize

@pytest.mark.slow  # over 25 s on 2 cores: leg 1 only (.ci/run)
def test_pre_ad_then_grad_matches_and_backward_is_low():
    p = gpt.init(jax.random.PRNGKey(0), **gpt.SIZES)
    b = gpt.example_batch(jax.random.PRNGKey(1), **gpt.SIZES)
    f = graphopt.optimize(gpt.loss, passes=["precision"], precision="bfloat16")
    g0, g1 = jax.grad(gpt.loss)(p, b), jax.grad(f)(p, b)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g1))
    err = max(testing.max_rel_error(a, c) for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert 0 < err < 0.1
    grad_jaxpr = jax.make_jaxpr(jax.grad(f))(p, b)
    low, tot = P.low_flop_share(grad_jaxpr)
    assert low / tot >= 0.95


def test_check_true_with_precision():
    params, x = _mlp_args()
    f = graphopt.optimize(_mlp, precision="bfloat16", check=True)
    f(params, x)
    errs = f.report(params, x).check_errors
    assert errs["outputs"]["ok"] and 0 < errs["outputs"]["max_rel_err"] < 5e-2


@pytest.mark.slow  # over 25 s on 2 cores: leg 1 only (.ci/run)
def test_post_ad_step_flop_share_and_float32_params():
    p = gpt.init(jax.random.PRNGKey(0), **gpt.SIZES)
    o = gpt.init_opt_state(p)
    b = gpt.example_batch(jax.random.PRNGKey(1), **gpt.SIZES)
    step = graphopt.optimize(gpt.train_step, passes=["precision"], precision="bfloat16")
    params, opt_state, loss = step(p, o, b)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert [x.dtype for x in jax.tree.leaves(opt_state)] == [x.dtype for x in jax.tree.leaves(o)]
    assert step.report(p, o, b).placement == "post-AD"
    low, tot = P.low_flop_share(step.jaxpr(p, o, b))
    assert low / tot >= 0.95
    assert abs(float(loss) - float(gpt.train_step(p, o, b)[2])) < 1e-2


def _train(step, params, opt_state, batches):
    def body(carry, batch):
        params, opt_state = carry
        params, opt_state, loss = step(params, opt_state, batch)
        return (params, opt_state), loss
    (params, _), losses = jax.jit(lambda c, bs: lax.scan(body, c, bs))((params, opt_state), batches)
    return params, np.asarray(losses)


def _gpt_batches(n, batch=8, seq=16, vocab=64):
    """Next token = previous + 1 (mod vocab), 10% of tokens random: a floor above 0."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    start = jax.random.randint(k1, (n, batch, 1), 0, vocab)
    toks = (start + jnp.arange(seq + 1)) % vocab
    noise = jax.random.randint(k2, toks.shape, 0, vocab)
    toks = jnp.where(jax.random.uniform(k3, toks.shape) < 0.1, noise, toks)
    return toks[..., :-1], toks[..., 1:]


def _cnn_batches(n, batch=16):
    templates = jax.random.normal(jax.random.PRNGKey(5), (10, 8, 8, 3))
    k1, k2 = jax.random.split(jax.random.PRNGKey(6))
    y = jax.random.randint(k1, (n, batch), 0, 10)
    return templates[y] + 1.0 * jax.random.normal(k2, (n, batch, 8, 8, 3)), y


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "cnn"])
def test_trains_like_float32(model):
    n = 100
    if model == "gpt":
        p, opt = gpt.init(jax.random.PRNGKey(0), **gpt.SIZES), optax.adam(3e-3)
        st, batches = gpt.make_train_step(opt), _gpt_batches(n)
    else:
        p, opt = cnn.init(jax.random.PRNGKey(1), **cnn.SIZES), optax.adam(3e-2)
        st, batches = cnn.make_train_step(opt), _cnn_batches(n)
    p32, l32 = _train(st, p, opt.init(p), batches)
    fast = graphopt.optimize(st, precision="bfloat16")
    p16, l16 = _train(fast, p, opt.init(p), batches)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    f32, b16 = l32[-20:].mean(), l16[-20:].mean()
    assert f32 < 0.8 * l32[:5].mean(), "the task must be learnable"
    assert abs(b16 - f32) <= 0.03 * f32, (f32, b16)
    assert not np.array_equal(l32, l16)  # bfloat16 really ran


def test_composes_with_memory_budget_and_fusions():
    params, x = _mlp_args()
    x = jnp.tile(x, (16, 1))
    f = graphopt.optimize(_mlp, precision="bfloat16", memory_budget=1.0,
                          passes=["prune", "fuse_parallel_dots", "precision"])
    assert abs(float(f(params, x)) - float(_mlp(params, x))) < 2e-2
    names = [r.name for r in f.report(params, x).records]
    assert "precision" in names and "remat" in names
    low, tot = P.low_flop_share(f.jaxpr(params, x))
    assert low / tot >= 0.95


def test_float16_post_ad_without_loss_scaling_warns_once(monkeypatch):
    monkeypatch.setattr(P, "_warned_fp16", False)
    p, x = _mlp_args()
    opt = optax.sgd(0.1)

    def step(p, s, x):
        g = jax.grad(_mlp)(p, x)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    with pytest.warns(UserWarning, match="loss scaling"):
        graphopt.optimize(step, precision="float16")(p, opt.init(p), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphopt.optimize(lambda p, s, x: step(p, s, x), precision="float16")(p, opt.init(p), x)


def test_drawing_colours_values_by_dtype():
    from graphopt import viz
    params, x = _mlp_args()
    f = graphopt.optimize(_mlp, passes=["precision"], precision="bfloat16")
    f(params, x)
    text = viz.draw(f, params, x, render=False, depth=None).source
    assert viz.DTYPE_COLORS["bf16"] in text
    assert viz.DTYPE_COLORS["bf16"] not in viz.draw(_mlp, params, x, render=False, depth=None).source
