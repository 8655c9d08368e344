"""Small CNN with batch norm (NHWC).

``len(channels)`` stages of 3x3 SAME convolution (no bias, as usual before
batch norm) -> batch norm -> ReLU, then global average pooling and a dense
head to ``classes`` logits. Loss: softmax cross-entropy on integer labels.

Params (float32)::

    {"conv{i}": {"w": [3, 3, C_in, C_out]},                 # HWIO
     "bn{i}":   {"scale", "bias", "mean", "var": [C_out]},  # mean/var: running statistics
     "head":    {"w": [C_last, classes], "b": [classes]}}

Batch norm: ``(y - mean) * rsqrt(var + eps) * scale + bias``.
  * ``apply(params, x, train=False)`` (inference) uses the running ``mean``/``var``
    stored in params, i.e. the conv -> BN pattern a conv+BN folding pass looks for.
  * ``train=True`` uses the statistics of the current batch (over N, H, W).

Design choice: the running statistics live inside params (under "bn{i}")
rather than in a separate state pytree, so every function keeps the zoo's
``(params, batch)`` interface. `loss` runs in train mode and never reads them,
so their gradient is exactly zero and Adam leaves them unchanged; update them
explicitly with `update_batch_stats` (an exponential moving average).
Plain JAX + optax only; train steps are not jitted.
"""

import math

import jax
import jax.numpy as jnp
import optax
from jax import lax

from . import _common

__all__ = [
    "SIZES", "BENCH_SIZES",
    "init", "apply", "loss", "example_batch", "optimizer", "init_opt_state",
    "make_train_step", "train_step", "update_batch_stats",
]

SIZES = {"batch": 2, "height": 8, "width": 8, "in_channels": 3, "channels": (4, 8), "classes": 10}
BENCH_SIZES = {"batch": 16, "height": 32, "width": 32, "in_channels": 3, "channels": (32, 64), "classes": 10}

BN_EPS = 1e-5


def init(key, in_channels=3, channels=(4, 8), classes=10, batch=None, height=None, width=None):
    """CNN params with fresh running stats (mean 0, var 1).

    `batch`, `height` and `width` are ignored; they let `init(key, **SIZES)` work.
    """
    del batch, height, width
    keys = jax.random.split(key, len(channels) + 1)
    params = {}
    c_in = in_channels
    for i, (k, c_out) in enumerate(zip(keys, channels)):
        # He init over the 3x3xC_in receptive field, since each conv feeds a ReLU (through BN).
        params[f"conv{i}"] = {"w": jax.random.normal(k, (3, 3, c_in, c_out), jnp.float32)
                                   * math.sqrt(2.0 / (9 * c_in))}
        params[f"bn{i}"] = {
            "scale": jnp.ones((c_out,), jnp.float32),
            "bias": jnp.zeros((c_out,), jnp.float32),
            "mean": jnp.zeros((c_out,), jnp.float32),
            "var": jnp.ones((c_out,), jnp.float32),
        }
        c_in = c_out
    params["head"] = {"w": _common.dense_init(keys[-1], c_in, classes),
                      "b": jnp.zeros((classes,), jnp.float32)}
    return params


def _num_stages(params):
    return sum(name.startswith("conv") for name in params)


def _conv(x, w):
    return lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _forward(params, x, train):
    """Logits and, in train mode, the per-stage batch statistics [(mean, var), ...]."""
    batch_stats = []
    for i in range(_num_stages(params)):
        y = _conv(x, params[f"conv{i}"]["w"])
        bn = params[f"bn{i}"]
        if train:
            mean = jnp.mean(y, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
            batch_stats.append((mean, var))
        else:
            mean, var = bn["mean"], bn["var"]
        y = (y - mean) * lax.rsqrt(var + BN_EPS) * bn["scale"] + bn["bias"]
        x = jax.nn.relu(y)
    x = jnp.mean(x, axis=(1, 2))  # global average pool -> [N, C]
    return x @ params["head"]["w"] + params["head"]["b"], batch_stats


def apply(params, x, train=False):
    """Logits [N, classes] for images x [N, H, W, C].

    Batch norm uses the statistics of x if `train`, else the running statistics in params.
    """
    return _forward(params, x, train)[0]


def loss(params, batch):
    """Softmax cross-entropy in train mode (batch statistics); batch = (images, labels)."""
    x, labels = batch
    return _common.cross_entropy(apply(params, x, train=True), labels)


def update_batch_stats(params, x, momentum=0.9):
    """Params whose running BN stats moved toward the batch stats of x.

    new = momentum * old + (1 - momentum) * batch; momentum=0 copies the batch statistics.
    """
    _, batch_stats = _forward(params, x, train=True)
    params = dict(params)
    for i, (mean, var) in enumerate(batch_stats):
        bn = params[f"bn{i}"]
        params[f"bn{i}"] = {**bn,
                            "mean": momentum * bn["mean"] + (1.0 - momentum) * mean,
                            "var": momentum * bn["var"] + (1.0 - momentum) * var}
    return params


def example_batch(key, batch=2, height=8, width=8, in_channels=3, classes=10, channels=None):
    """(images [batch, height, width, in_channels] float32, labels [batch] int32); `channels` is ignored."""
    del channels
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, height, width, in_channels), jnp.float32)
    labels = jax.random.randint(ky, (batch,), 0, classes, jnp.int32)
    return x, labels


def optimizer(learning_rate=1e-3):
    """Default optimizer: Adam (zero gradients leave the running stats untouched)."""
    return optax.adam(learning_rate)


def init_opt_state(params):
    """State of the default `optimizer()` for `params`."""
    return optimizer().init(params)


def make_train_step(opt):
    """`train_step(params, opt_state, batch) -> (params, opt_state, loss)` under `opt`."""
    return _common.make_train_step(loss, opt)


train_step = make_train_step(optimizer())
