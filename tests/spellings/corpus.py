"""Cross-entropy spellings: each ``f(h, w, b, y) -> scalar loss`` with logits ``h @ w (+ b)``.

``h``: [B, T, d]; ``w``: [d, V]; ``b``: [V]; ``y``: int [B, T]. Shifted spellings
predict ``y[:, 1:]`` from positions ``:-1``.
"""
import jax
import jax.numpy as jnp
import optax


def _lsm(z):
    return jax.nn.log_softmax(z, axis=-1)


def _take(lp, y):
    return jnp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]


def optax_integer(h, w, b, y):
    return optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()


def optax_one_hot(h, w, b, y):
    return optax.softmax_cross_entropy(h @ w, jax.nn.one_hot(y, w.shape[1])).mean()


def one_hot_log_softmax(h, w, b, y):
    return -(jax.nn.one_hot(y, w.shape[1]) * _lsm(h @ w)).sum(-1).mean()


def one_hot_total_sum(h, w, b, y):
    return -(jax.nn.one_hot(y, w.shape[1]) * _lsm(h @ w)).sum() / y.size


def take_along_axis(h, w, b, y):
    return -_take(_lsm(h @ w), y).mean()


def logsumexp_minus_label(h, w, b, y):
    z = h @ w
    return (jax.nn.logsumexp(z, axis=-1) - _take(z, y)).mean()


def shifted_logits(h, w, b, y):
    """The shift after the projection, as most GPT code writes it."""
    return -_take(_lsm(h @ w)[:, :-1], y[:, 1:]).mean()


def shifted_before(h, w, b, y):
    return -_take(_lsm(h[:, :-1] @ w), y[:, 1:]).mean()


def masked_mean(h, w, b, y):
    mask = (y != 0).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(h @ w, y)
    return (loss * mask).sum() / jnp.maximum(mask.sum(), 1)


def label_smoothing(h, w, b, y):
    t = optax.smooth_labels(jax.nn.one_hot(y, w.shape[1]), 0.1)
    return optax.softmax_cross_entropy(h @ w, t).mean()


def z_loss(h, w, b, y):
    z = h @ w
    lse = jax.nn.logsumexp(z, axis=-1)
    return (lse - _take(z, y) + 1e-4 * lse ** 2).mean()


def output_bias(h, w, b, y):
    return optax.softmax_cross_entropy_with_integer_labels(h @ w + b, y).mean()


def reshaped_bias(h, w, b, y):
    """flax nnx's Linear: the bias reshaped to [1, 1, V] and broadcast by the add."""
    return optax.softmax_cross_entropy_with_integer_labels(h @ w + b.reshape(1, 1, -1), y).mean()


def cast_logits(h, w, b, y):
    z = (h.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32)
    return -_take(_lsm(z), y).mean()


def tied_transposed(h, w, b, y):
    emb = w.T                                    # [V, d], the embedding table
    return optax.softmax_cross_entropy_with_integer_labels(h @ emb.T, y).mean()


def einsum_tied(h, w, b, y):
    emb = w.T
    z = jnp.einsum("btd,vd->btv", h, emb)
    return -_take(_lsm(z), y).mean()


def row_indexed(h, w, b, y):
    lp = jax.nn.log_softmax((h @ w).reshape(-1, w.shape[1]))
    return -lp[jnp.arange(y.size), y.reshape(-1)].mean()


def flattened_tokens(h, w, b, y):
    z = (h @ w).reshape(-1, w.shape[1])
    return optax.softmax_cross_entropy_with_integer_labels(z, y.reshape(-1)).mean()


SPELLINGS = {f.__name__: f for f in [
    optax_integer, optax_one_hot, one_hot_log_softmax, one_hot_total_sum, take_along_axis,
    logsumexp_minus_label, shifted_logits, shifted_before, masked_mean, label_smoothing, z_loss,
    output_bias, reshaped_bias, cast_logits, tied_transposed, einsum_tied, flattened_tokens, row_indexed]}
