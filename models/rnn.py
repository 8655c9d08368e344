"""Elman RNN over time with `lax.scan`.

Each step computes ``h = tanh(x_t @ w_x + h @ w_h + b)`` and a per-step output
``y_t = h @ w_y + b_y``; the loss is the mean squared error of the outputs to
targets. Everything, including the input and output projections, runs inside
the scan body on purpose: this is the naive reference a graph pass may
improve (e.g. by hoisting the time-independent matmuls out of the loop).

Params (float32): ``{"w_x": [in_dim, hidden], "w_h": [hidden, hidden], "b": [hidden],
"w_y": [hidden, out_dim], "b_y": [out_dim]}``. Inputs and outputs are batch-major
[batch, T, features]. Plain JAX + optax only; train steps are not jitted.
"""

import jax
import jax.numpy as jnp
import optax
from jax import lax

from . import _common

__all__ = [
    "SIZES", "BENCH_SIZES",
    "init", "apply", "loss", "example_batch", "optimizer", "init_opt_state",
    "make_train_step", "train_step",
]

SIZES = {"batch": 2, "T": 8, "in_dim": 3, "hidden": 16, "out_dim": 2}
BENCH_SIZES = {"batch": 64, "T": 256, "in_dim": 128, "hidden": 1024, "out_dim": 128}


def init(key, in_dim=3, hidden=16, out_dim=2, batch=None, T=None):
    """RNN params; `batch` and `T` are ignored (they let `init(key, **SIZES)` work)."""
    del batch, T
    kx, kh, ky = jax.random.split(key, 3)
    return {
        "w_x": _common.dense_init(kx, in_dim, hidden),
        # Orthogonal recurrent matrix: repeated multiplication neither blows up nor vanishes at init.
        "w_h": jax.nn.initializers.orthogonal()(kh, (hidden, hidden), jnp.float32),
        "b": jnp.zeros((hidden,), jnp.float32),
        "w_y": _common.dense_init(ky, hidden, out_dim),
        "b_y": jnp.zeros((out_dim,), jnp.float32),
    }


def apply(params, x, h0=None):
    """Outputs [batch, T, out_dim] for inputs x [batch, T, in_dim]; h0 [batch, hidden] defaults to zeros."""
    if h0 is None:
        h0 = jnp.zeros((x.shape[0], params["w_h"].shape[0]), x.dtype)

    def step(h, x_t):
        h = jnp.tanh(x_t @ params["w_x"] + h @ params["w_h"] + params["b"])
        return h, h @ params["w_y"] + params["b_y"]

    # scan walks the leading axis, so go time-major for the loop and back afterwards.
    _, ys = lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


def loss(params, batch):
    """Mean squared error of the outputs to the targets; batch = (x [B, T, in_dim], y [B, T, out_dim])."""
    x, y = batch
    return _common.mean_squared_error(apply(params, x), y)


def example_batch(key, batch=2, T=8, in_dim=3, out_dim=2, hidden=None):
    """(x [batch, T, in_dim], y [batch, T, out_dim]) standard-normal float32; `hidden` is ignored."""
    del hidden
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (batch, T, in_dim), jnp.float32),
            jax.random.normal(ky, (batch, T, out_dim), jnp.float32))


def optimizer(learning_rate=1e-3):
    """Default optimizer: Adam after global-norm clipping (the usual guard against RNN gradient spikes)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def init_opt_state(params):
    """State of the default `optimizer()` for `params`."""
    return optimizer().init(params)


def make_train_step(opt):
    """`train_step(params, opt_state, batch) -> (params, opt_state, loss)` under `opt`."""
    return _common.make_train_step(loss, opt)


train_step = make_train_step(optimizer())
