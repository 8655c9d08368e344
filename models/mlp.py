"""Multi-layer perceptrons: the seed MLP classifier and a deep residual MLP.

Seed MLP (`init`, `apply`, `loss`, ...): ``sizes=(2, 4, 3, 2)`` means inputs of
dimension 2 -> 4 -> 3 -> 2 logits, ReLU on the hidden layers, softmax
cross-entropy against integer class labels. Params are
``{"layers": [{"w": [m, n], "b": [n]}, ...]}``.

Deep residual MLP (`init_deep`, `apply_deep`, `loss_deep`, ...): ``depth``
blocks ``x = x + relu(x @ w1) @ w2`` (w1: width -> 4*width, w2: 4*width ->
width) on activations ``[batch, T, width]``, each block inside
``jax.named_scope(f"block{i}")`` and optionally wrapped in
``jax.checkpoint(block, policy=block_remat)``. Its loss is the mean squared
error to a target of the same shape. Params are ``{"blocks": [{"w1", "w2"}, ...]}``.

Plain JAX + optax only: params are pytrees of float32 arrays, and the
train steps are not jitted (callers choose how to trace/compile them).
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax

from . import _common

__all__ = [
    "SIZES", "BENCH_SIZES", "SIZES_DEEP", "BENCH_SIZES_DEEP",
    "init", "apply", "loss", "example_batch", "optimizer", "init_opt_state",
    "make_train_step", "train_step",
    "init_deep", "apply_deep", "loss_deep", "example_batch_deep",
    "make_train_step_deep", "train_step_deep",
]

SIZES = {"sizes": (2, 4, 3, 2), "batch": 8}
BENCH_SIZES = {"sizes": (1024, 4096, 4096, 1024), "batch": 512}
SIZES_DEEP = {"depth": 8, "width": 128, "batch": 4, "T": 256}
BENCH_SIZES_DEEP = {"depth": 32, "width": 1024, "batch": 8, "T": 1024}


# ----------------------------------------------------------------------------- seed MLP


def init(key, sizes=(2, 4, 3, 2), batch=None):
    """Params for an MLP with layer widths `sizes` (`batch` is ignored; it lets `init(key, **SIZES)` work)."""
    del batch
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        "layers": [
            # He scaling (sqrt 2) because every hidden layer feeds a ReLU.
            {"w": _common.dense_init(k, m, n, scale=math.sqrt(2.0)), "b": jnp.zeros((n,), jnp.float32)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])
        ]
    }


def apply(params, x):
    """Logits [batch, sizes[-1]] for inputs x [batch, sizes[0]]."""
    layers = params["layers"]
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def loss(params, batch):
    """Softmax cross-entropy of `apply(params, x)` against integer labels; batch = (x, labels)."""
    x, labels = batch
    return _common.cross_entropy(apply(params, x), labels)


def example_batch(key, sizes=(2, 4, 3, 2), batch=8):
    """(x [batch, sizes[0]] float32, labels [batch] int32 in [0, sizes[-1]))."""
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, sizes[0]), jnp.float32)
    labels = jax.random.randint(ky, (batch,), 0, sizes[-1], jnp.int32)
    return x, labels


def optimizer(learning_rate=1e-3):
    """Default optimizer of both MLPs: Adam."""
    return optax.adam(learning_rate)


def init_opt_state(params):
    """State of the default `optimizer()` for `params` (works for the seed and the deep MLP)."""
    return optimizer().init(params)


def make_train_step(opt):
    """`train_step(params, opt_state, batch) -> (params, opt_state, loss)` of the seed MLP under `opt`."""
    return _common.make_train_step(loss, opt)


train_step = make_train_step(optimizer())


# ----------------------------------------------------------------------------- deep residual MLP


def init_deep(key, depth=8, width=128, batch=None, T=None):
    """Params of `depth` residual blocks of width `width` (`batch`, `T` are ignored, for `**SIZES_DEEP`)."""
    del batch, T
    blocks = []
    for k in jax.random.split(key, depth):
        k1, k2 = jax.random.split(k)
        blocks.append({
            "w1": _common.dense_init(k1, width, 4 * width, scale=math.sqrt(2.0)),
            # 1/sqrt(depth) keeps the residual stream's variance O(1) after `depth` additions.
            "w2": _common.dense_init(k2, 4 * width, width, scale=1.0 / math.sqrt(depth)),
        })
    return {"blocks": blocks}


def _deep_block(p, x):
    return x + jax.nn.relu(x @ p["w1"]) @ p["w2"]


def apply_deep(params, x, block_remat=None):
    """Run the residual blocks on x [batch, T, width]; `block_remat` is an optional jax.checkpoint policy."""
    block = _deep_block
    if block_remat is not None:
        block = jax.checkpoint(_deep_block, policy=block_remat)
    for i, p in enumerate(params["blocks"]):
        with jax.named_scope(f"block{i}"):
            x = block(p, x)
    return x


def loss_deep(params, batch, block_remat=None):
    """Mean squared error of `apply_deep(params, x)` to y; batch = (x, y), both [batch, T, width]."""
    x, y = batch
    return _common.mean_squared_error(apply_deep(params, x, block_remat=block_remat), y)


def example_batch_deep(key, batch=4, T=256, width=128, depth=None):
    """(x, y), both [batch, T, width] float32 (`depth` is ignored, for `**SIZES_DEEP`)."""
    del depth
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (batch, T, width), jnp.float32),
            jax.random.normal(ky, (batch, T, width), jnp.float32))


def make_train_step_deep(opt, block_remat=None):
    """`train_step(params, opt_state, batch)` of the deep MLP under `opt`, with optional per-block remat."""
    return _common.make_train_step(functools.partial(loss_deep, block_remat=block_remat), opt)


train_step_deep = make_train_step_deep(optimizer())
