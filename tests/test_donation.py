"""graphopt.optimize(donate=...): inferred and explicit donation, the report's saving."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import graphopt
from graphopt import donation
from graphopt.models import gpt

K = jax.random.PRNGKey(0)
_nbytes = lambda t: sum(x.nbytes for x in jax.tree_util.tree_leaves(t))  # noqa: E731
_copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731


def _small_step():
    opt = optax.adam(1e-2)

    def step(params, opt_state, x):
        def loss(p):
            return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
        l, g = jax.value_and_grad(loss)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, l
    p = {"w": jax.random.normal(K, (8, 4)), "b": jnp.zeros(4)}
    return step, p, opt.init(p), jax.random.normal(K, (3, 8))


GPT = dict(n_layers=1, d_model=16, n_heads=2, seq_len=8, vocab=32, batch=2)
FAST = {"xla_backend_optimization_level": 0}  # same memory figures, quicker codegen


def test_gpt_step_auto_aliases_params_and_optimizer_state():
    p = gpt.init(K, **GPT)
    o = gpt.init_opt_state(p)
    b = gpt.example_batch(K, **GPT)
    state = _nbytes(p) + _nbytes(o)
    f = graphopt.optimize(gpt.train_step, passes=["prune"], donate="auto")
    ma = f.lower(p, o, b).compile(compiler_options=FAST).memory_analysis()
    assert ma.alias_size_in_bytes >= 0.95 * state
    notes = f.report(p, o, b).notes()
    n_bufs = 3 * len(jax.tree_util.tree_leaves(p)) + 1  # params, Adam's mu and nu, count
    assert any(n.startswith(f"donate (auto): {n_bufs} input buffer(s) of argument(s) "
                            "opt_state, params")
               for n in notes), notes
    assert any("batch[0], batch[1]: no output of the same shape and dtype computed from it"
               in n for n in notes), notes
    # without the option the report names the saving, in bytes
    g = graphopt.optimize(gpt.train_step, passes=["prune"])
    assert any(f"donating would save {graphopt.analysis.fmt_bytes(state)} ({state} bytes)" in n
               for n in g.report(p, o, b).notes())


def test_donated_loop_is_bit_identical_and_deletes_its_inputs():
    step, p, o, x = _small_step()
    plain = graphopt.optimize(step)
    donated = graphopt.optimize(step, donate="auto", check=True)  # checks before donating
    p1, o1 = p, o
    p2, o2 = _copy((p, o))
    for _ in range(8):
        p1, o1, _ = plain(p1, o1, x)
        old = p2
        p2, o2, _ = donated(p2, o2, x)
        assert old["w"].is_deleted() and not x.is_deleted()
    for a, b in zip(jax.tree_util.tree_leaves((p1, o1)), jax.tree_util.tree_leaves((p2, o2))):
        np.testing.assert_array_equal(a, b)
    # JAX's own error (a ValueError up to JAX 0.11, a RuntimeError on 0.12)
    with pytest.raises((ValueError, RuntimeError), match="deleted"):
        donated(old, o2, x)


def test_explicit_donate_argnums_and_argnames_as_in_jax_jit():
    step, p, o, x = _small_step()
    by_num = graphopt.optimize(step, donate_argnums=1)
    by_name = graphopt.optimize(step, donate_argnames="opt_state")
    want = graphopt.optimize(step)(p, o, x)
    for f in (by_num, by_name):
        ma = f.lower(p, o, x).compile().memory_analysis()
        assert ma.alias_size_in_bytes == _nbytes(o)
        o2 = _copy(o)
        out = f(p, o2, x)
        assert o2[0].mu["w"].is_deleted() and not p["w"].is_deleted()
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(a, b)
        assert any(n.startswith("donate (explicit)") for n in f.report(p, o, x).notes())


def test_returned_unchanged_and_closed_over_inputs_are_not_donated():
    c = jnp.ones(5)

    def f(x, y, z):
        return x, y * 2, z + c
    g = graphopt.optimize(f, donate="auto")
    x, y = jnp.arange(5.0), jnp.arange(5.0) + 1
    out = g(x, y, c)
    assert not x.is_deleted() and y.is_deleted() and not c.is_deleted()
    np.testing.assert_array_equal(out[1], (jnp.arange(5.0) + 1) * 2)
    notes = g.report(x, out[1], c).notes()
    assert any("not donated: x: returned unchanged" in n for n in notes), notes
    plan = donation.plan(g.jaxpr(x, out[1], c), ["x", "y", "z"], [x, out[1], c])
    assert plan.refused[2] == "the same array is also closed over by the function"
    assert sorted(plan.pairs) == [1]
    # the same array passed twice: that call runs without donation
    w = jnp.arange(5.0)
    g(jnp.arange(5.0), w, w)
    assert not w.is_deleted()


def test_auto_without_any_aliasable_output_is_a_noop_with_a_note():
    f = graphopt.optimize(lambda x: jnp.sum(x ** 2), donate="auto")
    x = jnp.arange(4.0)
    assert float(f(x)) == 14.0 and not x.is_deleted()
    assert any("no output can reuse any input's buffer" in n for n in f.report(x).notes())
    assert f.lower(x).compile().memory_analysis().alias_size_in_bytes == 0


@pytest.mark.parametrize("kw, msg", [
    (dict(donate="yes"), "donate must be 'auto', None or False, got 'yes'"),
    (dict(donate_argnums=3), "donate_argnums 3 is out of range"),
    (dict(donate_argnames="q"), "donate_argnames ['q'] name no argument"),
    (dict(donate_argnums=0, static_argnums=0), "both static and donated"),
    (dict(donate="auto", jit=False), "donation needs jit=True"),
    (dict(donate="auto", donate_argnums=0), "not both"),
    (dict(donate_argnums=-1), "non-negative ints"),
])
def test_bad_donation_options_name_the_problem(kw, msg):
    with pytest.raises(graphopt.OptionError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        graphopt.optimize(lambda a, b: (a, b), **kw)


def test_nnx_state_donated_and_written_back():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    def step(m, x):
        m.kernel.value = m.kernel.value - 0.1 * x.sum() * jnp.ones_like(m.kernel.value)
        return x.sum()
    f = graphopt.optimize(step, donate="auto")
    before, x = jnp.copy(model.kernel.value), jnp.ones((2, 3))
    old = model.kernel.value
    f(model, x)
    np.testing.assert_allclose(model.kernel.value, before - 0.6, rtol=1e-6)
    assert old.is_deleted() and not x.is_deleted()
    assert any(n.startswith("donate (auto)") for n in f.report(model, x).notes())


def test_pass_context_names_each_argument_place():
    seen = []

    def spy(cj, ctx):
        seen.append((ctx.arg_names, ctx.arg_positions))
        return graphopt.PassResult(cj, False)
    graphopt.optimize(lambda params, batch: params["w"] * batch, passes=[spy])(
        {"w": jnp.ones(2)}, jnp.ones(2))
    assert seen == [(("params", "batch"), (1, 0))]  # leaves follow the sorted names


def test_remat_note_names_the_batch_argument():
    from graphopt.models import mlp
    s = dict(depth=2, width=16, batch=4, T=8)
    p = mlp.init_deep(K, **s)
    args = (p, mlp.init_opt_state(p), mlp.example_batch_deep(K, **s))
    f = graphopt.optimize(mlp.train_step_deep, passes=["remat"], memory_budget=0.5)
    rec = next(r for r in f.report(*args).records if r.name == "remat")
    assert any("(argument 'batch', the last array argument of the call" in n
               for n in rec.stats.notes), rec.stats.notes
