"""Loss scaling for float16 training, as an optax-compatible wrapper.

float16 flushes values below ~6e-8 to zero, so the small gradients of a training step
vanish once its backward pass runs in float16 (``graphopt.optimize(step,
precision="float16")``). Loss scaling multiplies the loss by a large factor before
differentiation and divides the gradients by it before the optimizer sees them::

    opt = graphopt.loss_scaling(optax.adamw(1e-3))        # dynamic scale
    state = opt.init(params)

    def step(params, state, batch):
        grads = jax.grad(lambda p: opt.scale_loss(loss(p, batch), state))(params)
        updates, state = opt.update(grads, state, params)  # unscaled, checked, applied
        return optax.apply_updates(params, updates), state

Dynamic scaling (the default) skips a step whose gradients hold an inf or NaN (the
update is zero and the inner optimizer state is left as it was) and halves the scale;
after ``growth_interval`` finite steps in a row it doubles it. ``dynamic=False`` keeps
``initial_scale`` fixed (non-finite steps are still skipped).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Name scope of the wrapper's update: the precision pass looks for it before warning.
SCOPE = "graphopt_loss_scaling"


class LossScaleState(NamedTuple):
    scale: jax.Array        # float32 scalar the loss is multiplied by
    good_steps: jax.Array   # int32: finite steps since the scale last changed
    skipped: jax.Array      # int32: steps skipped for non-finite gradients, in all
    inner: Any              # the wrapped optimizer's state


class LossScaling(NamedTuple):
    """An optax ``GradientTransformation`` (``init``, ``update``) plus ``scale_loss``."""
    init: Callable
    update: Callable
    scale_loss: Callable


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def loss_scaling(inner, *, dynamic: bool = True, initial_scale: float = 2.0 ** 15,
                 growth_interval: int = 2000, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, min_scale: float = 1.0) -> LossScaling:
    """Wrap optax optimizer ``inner`` with (dynamic or static) loss scaling."""
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"graphopt.loss_scaling: expected an optax GradientTransformation "
                        f"(with init and update), got {type(inner).__name__}")
    if initial_scale <= 0 or min_scale <= 0:
        raise ValueError("graphopt.loss_scaling: initial_scale and min_scale must be > 0")
    if growth_interval < 1 or growth_factor < 1 or not 0 < backoff_factor < 1:
        raise ValueError("graphopt.loss_scaling: need growth_interval >= 1, "
                         "growth_factor >= 1 and 0 < backoff_factor < 1")

    def init(params):
        return LossScaleState(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32),
                              jnp.zeros((), jnp.int32), inner.init(params))

    def scale_loss(loss, state: LossScaleState):
        with jax.named_scope(SCOPE):
            return loss * state.scale.astype(jnp.result_type(loss))

    def update(grads, state: LossScaleState, params=None, **extra):
        with jax.named_scope(SCOPE):
            inv = 1.0 / state.scale
            grads = jax.tree_util.tree_map(
                lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)
            finite = _all_finite(grads)
            # a skipped step must not feed infs into the inner state: zero them first
            safe = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)),
                                          grads)
            updates, new_inner = inner.update(safe, state.inner, params, **extra)
            updates = jax.tree_util.tree_map(
                lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
            new_inner = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                               new_inner, state.inner)
            skipped = state.skipped + (~finite).astype(jnp.int32)
            if not dynamic:
                return updates, LossScaleState(state.scale, state.good_steps, skipped, new_inner)
            good = jnp.where(finite, state.good_steps + 1, 0)
            grow = good >= growth_interval
            scale = jnp.where(finite,
                              jnp.where(grow, state.scale * growth_factor, state.scale),
                              jnp.maximum(state.scale * backoff_factor, min_scale))
            good = jnp.where(grow, 0, good)
            return updates, LossScaleState(scale.astype(jnp.float32), good.astype(jnp.int32),
                                           skipped, new_inner)

    return LossScaling(init, update, scale_loss)


__all__ = ["loss_scaling", "LossScaling", "LossScaleState", "SCOPE"]
