"""graphopt.loss_scaling: float16 training that underflows without it trains with it."""
import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from jax import lax

import graphopt

SMALL = 1e-6  # a loss this small (a sum over many tokens, normalised) has float16-subnormal grads


def _loss(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["w1"])
    return SMALL * jnp.mean((h @ p["w2"] - y) ** 2)


def _setup():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {"w1": jax.random.normal(k1, (16, 32)) / 4, "w2": jax.random.normal(k2, (32, 8)) / 6}
    teacher = jax.random.normal(k3, (16, 8)) / 4
    x = jax.random.normal(k4, (64, 16))
    return p, (x, jnp.tanh(x @ teacher))


def _plain_step(opt):
    def step(p, s, batch):
        l, g = jax.value_and_grad(_loss)(p, batch)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, l
    return step


def _scaled_step(opt):
    def step(p, s, batch):
        def scaled(p):
            l = _loss(p, batch)
            return opt.scale_loss(l, s), l
        g, l = jax.grad(scaled, has_aux=True)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, l
    return step


def _train(step, p, s, batch, n=80):
    def body(c, _):
        p, s = c
        p, s, l = step(p, s, batch)
        return (p, s), l
    (p, s), ls = jax.jit(lambda c: lax.scan(body, c, None, length=n))((p, s))
    return p, s, np.asarray(ls) / SMALL


def test_float16_underflows_without_scaling_and_trains_with_it():
    p, batch = _setup()
    adam = optax.adam(1e-2)
    _, _, l32 = _train(jax.jit(_plain_step(adam)), p, adam.init(p), batch)
    assert l32[-1] < 0.5 * l32[0]  # the float32 run learns
    with pytest.warns(UserWarning, match="loss scaling"):
        fp16 = graphopt.optimize(_plain_step(adam), precision="float16")
        fp16(p, adam.init(p), batch)
    _, _, l16 = _train(fp16, p, adam.init(p), batch)
    assert abs(l16[-1] - l16[0]) < 1e-3 * l16[0]  # gradients flushed to zero: no progress
    # the default 2**15 is too small for these gradients at first; the scale grows
    scaled = graphopt.loss_scaling(adam, growth_interval=5)
    p_s, s, ls = _train(graphopt.optimize(_scaled_step(scaled), precision="float16"),
                        p, scaled.init(p), batch)
    assert float(s.scale) > 2.0 ** 15
    assert ls[-1] < 0.5 * ls[0] and abs(ls[-1] - l32[-1]) < 0.1 * l32[0], (ls[-1], l32[-1])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p_s))


def test_dynamic_scale_skips_non_finite_and_grows():
    p = {"w": jnp.ones(3)}
    opt = graphopt.loss_scaling(optax.sgd(1.0), initial_scale=8.0, growth_interval=2)
    s = opt.init(p)
    u, s = opt.update({"w": jnp.array([1.0, jnp.inf, 0.0])}, s, p)
    assert float(jnp.abs(u["w"]).sum()) == 0 and float(s.scale) == 4.0 and int(s.skipped) == 1
    for _ in range(2):
        u, s = opt.update({"w": jnp.full(3, 4.0)}, s, p)
    np.testing.assert_allclose(u["w"], -1.0)  # 4 / scale 4, sgd lr 1
    assert float(s.scale) == 8.0 and int(s.good_steps) == 0


def test_static_scale_and_bad_arguments():
    opt = graphopt.loss_scaling(optax.sgd(1.0), dynamic=False, initial_scale=16.0)
    s = opt.init({"w": jnp.ones(2)})
    u, s = opt.update({"w": jnp.array([32.0, jnp.nan])}, s)
    assert float(s.scale) == 16.0 and int(s.skipped) == 1 and float(jnp.abs(u["w"]).sum()) == 0
    assert float(opt.scale_loss(jnp.float32(2.0), s)) == 32.0
    with pytest.raises(TypeError, match="GradientTransformation"):
        graphopt.loss_scaling(lambda g: g)
    with pytest.raises(ValueError, match="backoff_factor"):
        graphopt.loss_scaling(optax.sgd(1.0), backoff_factor=2.0)
