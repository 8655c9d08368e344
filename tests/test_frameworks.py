"""flax NNX and equinox arguments through ``graphopt.optimize``: training loops match
``nnx.jit`` / ``eqx.filter_jit`` step by step, state comes back to the caller's objects,
and what cannot be carried back is an error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import graphopt
from graphopt import GraphoptError

# 20-step training loops against nnx.jit / eqx.filter_jit: the slow tier (CI's JAX 0.11 leg runs the fast one)
pytestmark = pytest.mark.slow

optax = pytest.importorskip("optax")
pytest.importorskip("flax", minversion="0.12")  # Optimizer.update(model, grads), nnx.List
nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")

STEPS = 20
RTOL, ATOL = 1e-5, 1e-6
REMAT = dict(memory_budget=0.5, remat_measure="estimate", remat_solver="greedy")  # quick


def _batch(n=16, d=6, out=3, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, d)), jax.random.normal(ky, (n, out))


def _close(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=RTOL, atol=ATOL)


def _changed_passes(report):
    return [r.name for r in report.records if r.changed]


# ---------------------------------------------------------------------- flax NNX
class Net(nnx.Module):
    def __init__(self, rngs, d=6, h=16, out=3, dropout=0.2):
        self.l1 = nnx.Linear(d, h, rngs=rngs)
        self.bn = nnx.BatchNorm(h, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(h, out, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(x)))))


def _nnx_setup(**kw):
    model = Net(nnx.Rngs(0, dropout=1), **kw)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    metric = nnx.metrics.Average()
    return model, opt, metric


def nnx_step(model, opt, metric, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    metric.update(values=loss)
    return loss


def _nnx_run(wrap, steps=STEPS, **kw):
    model, opt, metric = _nnx_setup(**kw)
    step = wrap(nnx_step)
    x, y = _batch()
    losses = [float(step(model, opt, metric, x, y)) for _ in range(steps)]
    return losses, (model, opt, metric), step


_NNX_REF: dict = {}


def _nnx_reference(steps):
    if steps not in _NNX_REF:
        losses, objs, _ = _nnx_run(nnx.jit, steps)
        _NNX_REF[steps] = losses, nnx.state(objs)
    return _NNX_REF[steps]


@pytest.mark.parametrize("wrap, steps", [
    pytest.param(graphopt.optimize, STEPS, id="optimize"),
    pytest.param(lambda f: nnx.jit(graphopt.optimize(f)), STEPS, id="nnx.jit-outside"),
    # check=True compares op by op on the first call; a few steps show the state still flows
    pytest.param(lambda f: graphopt.optimize(f, check=True), 3, id="check"),
])
def test_nnx_training_loop_matches_nnx_jit(wrap, steps):
    ref_losses, ref_state = _nnx_reference(steps)
    losses, objs, step = _nnx_run(wrap, steps)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    # params, adam moments and step, batch statistics, dropout RNG count, the metric
    _close(nnx.state(objs), ref_state)
    assert int(objs[1].step[...]) == steps
    assert int(objs[0].drop.rngs.count[...]) == int(ref_state[0]["drop"]["rngs"]["count"][...])


def test_nnx_old_behaviour_params_never_updated_is_gone():
    model, opt, metric = _nnx_setup()
    before = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.Param))
    step = graphopt.optimize(nnx_step)
    x, y = _batch()
    losses = [float(step(model, opt, metric, x, y)) for _ in range(3)]
    after = nnx.state(model, nnx.Param)
    assert losses[0] != losses[1] != losses[2]
    assert not np.allclose(before["l1"]["kernel"][...], after["l1"]["kernel"][...])
    assert int(opt.step[...]) == 3
    assert int(metric.count[...]) == 3


def test_nnx_report_jaxpr_lower_and_passes_ran():
    model, opt, metric = _nnx_setup()
    x, y = _batch()
    step = graphopt.optimize(nnx_step)
    rep = step.report(model, opt, metric, x, y)
    assert rep.placement == "post-AD" and rep.records
    assert _changed_passes(rep), "no pass changed the nnx step"
    assert len(step.jaxpr(model, opt, metric, x, y).jaxpr.eqns) < \
        len(step.original_jaxpr(model, opt, metric, x, y).jaxpr.eqns)
    step.lower(model, opt, metric, x, y).compile()
    # report/jaxpr/lower do not run the step: nothing was written back
    assert int(opt.step[...]) == 0


class Deep(nnx.Module):
    def __init__(self, rngs, d=32, depth=6):
        self.layers = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(depth)])
        self.bn = nnx.BatchNorm(d, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.bn(x)


def test_nnx_memory_budget_matches_nnx_jit():
    x, y = _batch(n=64, d=32, out=32)
    runs = {}
    for name, wrap in [("ref", nnx.jit), ("remat", lambda f: graphopt.optimize(f, **REMAT))]:
        model = Deep(nnx.Rngs(0))
        objs = (model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param),
                nnx.metrics.Average())
        step = wrap(nnx_step)
        runs[name] = ([float(step(*objs, x, y)) for _ in range(STEPS)], nnx.state(objs), step,
                      objs)
    np.testing.assert_allclose(runs["remat"][0], runs["ref"][0], rtol=RTOL)
    _close(runs["remat"][1], runs["ref"][1])
    rec = next(r for r in runs["remat"][2].report(*runs["remat"][3], x, y).records
               if r.name == "remat")
    assert rec.changed and rec.stats.hits["remat.segment"] > 0  # it did recompute


def test_nnx_shared_reference_model_inside_optimizer():
    model = Net(nnx.Rngs(0, dropout=1))
    both = nnx.ModelAndOptimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ref_model = Net(nnx.Rngs(0, dropout=1))
    ref_both = nnx.ModelAndOptimizer(ref_model, optax.adam(1e-2), wrt=nnx.Param)

    def step(model, both, x, y):
        assert both.model is model  # the sharing survives the round trip
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        both.update(g)
        return loss

    x, y = _batch()
    f, g = graphopt.optimize(step), nnx.jit(step)
    for _ in range(5):
        np.testing.assert_allclose(float(f(model, both, x, y)), float(g(ref_model, ref_both, x, y)),
                                   rtol=RTOL)
    assert both.model is model
    _close(nnx.state(model), nnx.state(ref_model))


def test_nnx_returning_the_argument_returns_the_callers_object():
    model, opt, metric = _nnx_setup()
    x, y = _batch()

    def step2(model, opt, x, y):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, g)
        return model, loss
    m2, loss = graphopt.optimize(step2)(model, opt, x, y)
    assert m2 is model and int(opt.step[...]) == 1


def test_nnx_structure_change_is_an_error_not_a_silent_loss():
    model, opt, metric = _nnx_setup()
    x, y = _batch()

    def grows(model, x):
        model.extra = nnx.Param(jnp.ones(3))
        return model(x).sum()

    with pytest.raises(GraphoptError, match="structure of its flax NNX"):
        graphopt.optimize(grows)(model, x)
    assert not hasattr(model, "extra")

    def makes_new(model, x):
        return nnx.Linear(2, 2, rngs=nnx.Rngs(0)), model(x).sum()

    with pytest.raises(GraphoptError, match="not one of the arguments"):
        graphopt.optimize(makes_new)(model, x)


def test_nnx_forward_and_eval_mode():
    model, _, _ = _nnx_setup()
    model.eval()  # BatchNorm uses running stats, Dropout off: a pure forward
    x, _ = _batch()
    f = graphopt.optimize(lambda m, x: m(x))
    np.testing.assert_allclose(f(model, x), nnx.jit(lambda m, x: m(x))(model, x), rtol=RTOL,
                               atol=ATOL)
    model.train()  # a different graph definition: traced again, not a stale program
    out = f(model, x)
    assert out.shape == (16, 3)
    assert int(model.drop.rngs.count[...]) == 1  # the RNG counter came back


# ---------------------------------------------------------------------- equinox
def _mlp(key=0):
    return eqx.nn.MLP(6, 3, 16, 2, activation=jax.nn.relu, key=jax.random.key(key))


class ConvNet(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear
    act: object  # a function leaf: static

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.act = jax.nn.gelu
        self.conv = eqx.nn.Conv2d(2, 4, 3, padding=1, key=k1)
        self.head = eqx.nn.Linear(4 * 6 * 6, 3, key=k2)

    def __call__(self, x):
        return self.head(self.act(self.conv(x)).reshape(-1))


def _eqx_loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _eqx_train(wrap, model, x, y, steps=STEPS):
    optim = optax.adam(1e-2)

    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(_eqx_loss)(model, x, y)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    f = wrap(step)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    losses = []
    for _ in range(steps):
        model, opt_state, loss = f(model, opt_state, x, y)
        losses.append(float(loss))
    return losses, model, f, opt_state


@pytest.mark.parametrize("kind, wrap, steps", [
    pytest.param("mlp", graphopt.optimize, STEPS, id="mlp"),
    pytest.param("conv", graphopt.optimize, STEPS, id="conv"),
    pytest.param("mlp", lambda f: graphopt.optimize(f, check=True), 3, id="mlp-check"),
])
def test_equinox_training_loop_matches_filter_jit(kind, wrap, steps):
    if kind == "mlp":
        model, (x, y) = _mlp(), _batch()
    else:
        model = ConvNet(jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (8, 2, 6, 6))
        y = jax.random.normal(jax.random.key(2), (8, 3))
    ref_losses, ref_model, _, _ = _eqx_train(eqx.filter_jit, model, x, y, steps)
    losses, new_model, _, _ = _eqx_train(wrap, model, x, y, steps)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    _close(eqx.filter(new_model, eqx.is_array), eqx.filter(ref_model, eqx.is_array))
    # the returned module is whole again, its static leaves the caller's objects
    expect = jax.nn.relu if kind == "mlp" else jax.nn.gelu
    assert (new_model.activation if kind == "mlp" else new_model.act) is expect


def test_equinox_memory_budget_and_report():
    model = eqx.nn.MLP(32, 32, 32, 6, activation=jnp.tanh, key=jax.random.key(0))
    x, y = _batch(n=64, d=32, out=32)
    ref_losses, ref_model, _, _ = _eqx_train(eqx.filter_jit, model, x, y)
    losses, new_model, f, opt_state = _eqx_train(
        lambda s: graphopt.optimize(s, **{**REMAT, "memory_budget": 0.6}), model, x, y)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    _close(eqx.filter(new_model, eqx.is_array), eqx.filter(ref_model, eqx.is_array))
    rep = f.report(new_model, opt_state, x, y)
    rec = next(r for r in rep.records if r.name == "remat")
    assert rep.placement == "post-AD" and rec.changed and rec.stats.hits["remat.segment"] > 0


def test_equinox_module_passed_directly_to_a_loss():
    model, (x, y) = _mlp(), _batch()
    f = graphopt.optimize(_eqx_loss)
    np.testing.assert_allclose(f(model, x, y), _eqx_loss(model, x, y), rtol=RTOL)
    # pre-AD: eqx.filter_grad outside the optimized loss
    g = eqx.filter_grad(f)(model, x, y)
    g_ref = eqx.filter_grad(_eqx_loss)(model, x, y)
    _close(eqx.filter(g, eqx.is_array), eqx.filter(g_ref, eqx.is_array))
    assert f.report(model, x, y).records


def test_equinox_static_leaf_is_part_of_the_cache_key():
    x, y = _batch()
    f = graphopt.optimize(_eqx_loss)
    relu, tanh = _mlp(), eqx.tree_at(lambda m: m.activation, _mlp(), jax.nn.tanh)
    a, b = f(relu, x, y), f(tanh, x, y)
    np.testing.assert_allclose(a, _eqx_loss(relu, x, y), rtol=RTOL)
    np.testing.assert_allclose(b, _eqx_loss(tanh, x, y), rtol=RTOL)
    assert float(a) != float(b)


class Unhashable:
    __hash__ = None

    def __call__(self, x):
        return x


class Holder(eqx.Module):
    w: jax.Array
    fn: object


def test_equinox_unhashable_static_leaf_is_a_clear_error():
    m = Holder(jnp.ones(3), Unhashable())
    with pytest.raises(TypeError, match=r"graphopt.optimize\(f\).*\.fn.*not hashable"):
        graphopt.optimize(f)(m)


def f(m):  # a named function, for the error message
    return m.fn(m.w).sum()


def test_non_array_leaf_outside_equinox_still_refused():
    with pytest.raises(TypeError, match="not an array; mark it static"):
        graphopt.optimize(f)({"w": jnp.ones(3), "fn": jax.nn.relu})


@settings(max_examples=8, deadline=None)
@given(scale=st.floats(0.1, 4.0), power=st.integers(1, 3), use_tanh=st.booleans())
def test_equinox_python_number_leaves_are_static_like_filter_jit(scale, power, use_tanh):
    class Scaled(eqx.Module):
        w: jax.Array
        scale: float
        power: int
        act: object

        def __call__(self, x):
            y = self.act(x @ self.w * self.scale)
            return jnp.concatenate([y] * self.power)  # a Python int: must be static

    m = Scaled(jnp.linspace(-1, 1, 12).reshape(4, 3), scale, power,
               jax.nn.tanh if use_tanh else jax.nn.relu)
    x = jnp.linspace(-2, 2, 8).reshape(2, 4)
    got = graphopt.optimize(lambda m, x: m(x).sum())(m, x)
    np.testing.assert_allclose(got, eqx.filter_jit(lambda m, x: m(x).sum())(m, x), rtol=RTOL,
                               atol=ATOL)


def test_nnx_objects_inside_containers_and_bare_variables():
    model, opt, metric = _nnx_setup()
    ref_model, ref_opt, ref_metric = _nnx_setup()
    x, y = _batch()

    def step(objs, x, y):
        return nnx_step(objs["model"], objs["opt"], objs["metric"], x, y)

    f, g = graphopt.optimize(step), nnx.jit(step)
    for _ in range(3):
        np.testing.assert_allclose(
            f({"model": model, "opt": opt, "metric": metric}, x, y),
            g({"model": ref_model, "opt": ref_opt, "metric": ref_metric}, x, y), rtol=RTOL)
    _close(nnx.state((model, opt, metric)), nnx.state((ref_model, ref_opt, ref_metric)))

    v = nnx.Param(jnp.ones(3))

    def bump(v, k):
        v[...] = v[...] * k
        return v[...].sum()

    assert float(graphopt.optimize(bump)(v, 2.0)) == 6.0
    np.testing.assert_array_equal(v[...], 2 * np.ones(3))


def test_nnx_mutating_a_captured_object_is_an_error():
    model, _, _ = _nnx_setup()
    x, _ = _batch()

    def step(x):
        model.l1.kernel[...] = model.l1.kernel[...] * 2  # captured, not an argument
        return x.sum()

    with pytest.raises(Exception, match="trace level"):  # flax's TraceContextError
        graphopt.optimize(step)(x)


def test_nnx_same_object_twice_stays_one_object():
    m = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    k0 = np.asarray(m.kernel[...])

    def f(a, b, x):
        assert a is b
        a.kernel[...] = a.kernel[...] + 1
        return b(x).sum()

    graphopt.optimize(f)(m, m, jnp.ones((4, 3)))
    np.testing.assert_allclose(m.kernel[...], k0 + 1)
