"""Small helpers shared by the zoo models (plain JAX + optax, no graphopt)."""

import math

import jax
import jax.numpy as jnp
import optax


def dense_init(key, fan_in, fan_out, scale=1.0):
    """Normal(0, scale**2 / fan_in) weight of shape [fan_in, fan_out], float32."""
    # Variance 1/fan_in keeps activations O(1) through a matmul; `scale` adjusts for ReLU/residuals.
    return jax.random.normal(key, (fan_in, fan_out), jnp.float32) * (scale / math.sqrt(fan_in))


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy of `logits` [..., C] against integer `labels` [...]."""
    # log_softmax in float32 so a bf16 forward still yields an accurate float32 loss.
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def mean_squared_error(pred, target):
    """Mean over all elements of (pred - target)**2, as a float32 scalar."""
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def make_train_step(loss_fn, opt):
    """Return `train_step(params, opt_state, batch) -> (params, opt_state, loss)` for `loss_fn`.

    The step is not jitted: callers (and graph transforms) decide how to trace/compile it.
    """

    def train_step(params, opt_state, batch):
        loss_value, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss_value

    return train_step
