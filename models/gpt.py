"""GPT-style decoder-only transformer with hand-written (plain) attention.

Token + learned position embeddings, ``n_layers`` pre-LayerNorm blocks
(causal multi-head self-attention, then a 4x GELU MLP), a final LayerNorm
and an output projection (untied ``w_out`` [d_model, vocab] by default, or
tied to the token embedding). The loss is next-token softmax cross-entropy.

Params (float32)::

    {"wte": [vocab, d], "wpe": [seq_len, d], "ln_f": {"scale", "bias"},
     "w_out": [d, vocab]                      # absent when tied=True
     "blocks": [{"ln1": {"scale", "bias"},
                 "attn": {"wq", "wk", "wv": [d, H, Dh], "wo": [H, Dh, d]},
                 "ln2": {"scale", "bias"},
                 "mlp": {"w_fc": [d, 4d], "b_fc": [4d], "w_proj": [4d, d], "b_proj": [d]}},
                ...]}

The attention weights keep an explicit head axis so the params alone fix
``n_heads``; the forward pass still runs them as 2-D matmuls and splits heads
with a reshape to [B, T, H, Dh]. With ``scan_layers=True`` "blocks" is one
dict whose leaves are stacked along a leading [n_layers] axis (see
`stack_blocks` / `unstack_blocks`) and the blocks run under `lax.scan`.

Options of `apply` / `loss` (keyword-only):
  * ``dtype``: compute dtype of the matmuls (params stay float32 and are cast);
    LayerNorm, the residual stream and the loss stay float32.
  * ``scan_layers``: run stacked blocks under `lax.scan` (unrolled otherwise;
    unrolled also accepts stacked params).
  * ``block_remat``: a `jax.checkpoint` policy wrapped around every block.

Name scopes: unrolled blocks run in ``block{i}``, scanned ones in ``block``;
the core softmax(q kᵀ / sqrt(Dh)) v of each block runs in ``attention``.
Plain JAX + optax only; train steps are not jitted.
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax import lax

from . import _common

__all__ = [
    "SIZES", "BENCH_SIZES",
    "init", "apply", "loss", "example_batch", "optimizer", "init_opt_state",
    "make_train_step", "train_step",
    "attention", "layernorm", "stack_blocks", "unstack_blocks",
]

SIZES = {"n_layers": 2, "d_model": 32, "n_heads": 4, "seq_len": 16, "vocab": 64, "batch": 2}
BENCH_SIZES = {"n_layers": 12, "d_model": 1024, "n_heads": 16, "seq_len": 1024, "vocab": 8192, "batch": 8}

LN_EPS = 1e-5


# ----------------------------------------------------------------------------- params


def _ln_params(d):
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def _block_params(key, d, n_heads, n_layers):
    kq, kk, kv, ko, kf, kp = jax.random.split(key, 6)
    dh = d // n_heads
    # GPT-2 style: projections that write into the residual stream are scaled by 1/sqrt(2 * n_layers).
    resid = 1.0 / math.sqrt(2 * n_layers)
    return {
        "ln1": _ln_params(d),
        "attn": {
            "wq": _common.dense_init(kq, d, d).reshape(d, n_heads, dh),
            "wk": _common.dense_init(kk, d, d).reshape(d, n_heads, dh),
            "wv": _common.dense_init(kv, d, d).reshape(d, n_heads, dh),
            "wo": _common.dense_init(ko, d, d, scale=resid).reshape(n_heads, dh, d),
        },
        "ln2": _ln_params(d),
        "mlp": {
            "w_fc": _common.dense_init(kf, d, 4 * d),
            "b_fc": jnp.zeros((4 * d,), jnp.float32),
            "w_proj": _common.dense_init(kp, 4 * d, d, scale=resid),
            "b_proj": jnp.zeros((d,), jnp.float32),
        },
    }


def init(key, n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab=64, batch=None, *,
         tied=False, scan_layers=False):
    """GPT params (float32), with stacked blocks if `scan_layers`; no `w_out` if `tied`.

    `batch` is ignored; it lets `init(key, **SIZES)` work.
    """
    del batch
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    k_tok, k_pos, k_out, *k_blocks = jax.random.split(key, 3 + n_layers)
    params = {
        "wte": 0.02 * jax.random.normal(k_tok, (vocab, d_model), jnp.float32),
        "wpe": 0.02 * jax.random.normal(k_pos, (seq_len, d_model), jnp.float32),
        "blocks": [_block_params(k, d_model, n_heads, n_layers) for k in k_blocks],
        "ln_f": _ln_params(d_model),
    }
    if not tied:
        params["w_out"] = _common.dense_init(k_out, d_model, vocab)
    return stack_blocks(params) if scan_layers else params


def _is_stacked(blocks):
    return isinstance(blocks, dict)


def stack_blocks(params):
    """Copy of `params` whose per-block list is stacked into one dict of [n_layers, ...] leaves."""
    blocks = params["blocks"]
    if _is_stacked(blocks):
        return params
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_blocks(params):
    """Inverse of `stack_blocks`: the stacked blocks become a list of per-block dicts."""
    blocks = params["blocks"]
    if not _is_stacked(blocks):
        return params
    n_layers = jax.tree.leaves(blocks)[0].shape[0]
    return {**params, "blocks": [jax.tree.map(lambda a: a[i], blocks) for i in range(n_layers)]}


# ----------------------------------------------------------------------------- forward


def layernorm(p, x, eps=LN_EPS):
    """LayerNorm over the last axis, written out with mean and variance."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attention(q, k, v, causal=True):
    """Plain reference attention: softmax(q kᵀ / sqrt(Dh), masked) v.

    q: [B, T, H, Dh], k and v: [B, S, H, Dh] -> [B, T, H, Dh], all in q's dtype.
    The causal mask aligns the last query with the last key (query t sees keys <= t + S - T).
    """
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    if causal:
        t, s_len = s.shape[-2:]
        mask = jnp.tril(jnp.ones((t, s_len), jnp.bool_), k=s_len - t)
        # finfo.min rather than -inf: a fully masked row then gives a uniform softmax, not NaN.
        s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
    probs = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _dense(x, w, dtype):
    # Params are float32; cast both operands so the matmul itself runs in the compute dtype.
    return x.astype(dtype) @ w.astype(dtype)


def _block(p, x, dtype):
    """One pre-LN transformer block on the float32 residual stream x [B, T, d]."""
    b, t, d = x.shape
    attn = p["attn"]
    _, n_heads, dh = attn["wq"].shape

    h = layernorm(p["ln1"], x)
    q, k, v = (_dense(h, attn[name].reshape(d, n_heads * dh), dtype).reshape(b, t, n_heads, dh)
               for name in ("wq", "wk", "wv"))
    with jax.named_scope("attention"):
        a = attention(q, k, v, causal=True)
    x = x + _dense(a.reshape(b, t, n_heads * dh), attn["wo"].reshape(n_heads * dh, d), dtype)

    mlp = p["mlp"]
    h = layernorm(p["ln2"], x)
    h = jax.nn.gelu(_dense(h, mlp["w_fc"], dtype) + mlp["b_fc"].astype(dtype))
    return x + _dense(h, mlp["w_proj"], dtype) + mlp["b_proj"]


def apply(params, tokens, *, dtype=jnp.float32, scan_layers=False, block_remat=None):
    """Logits [B, T, vocab] (in `dtype`) for int tokens [B, T] with T <= seq_len."""
    _, t = tokens.shape
    x = params["wte"][tokens] + params["wpe"][:t]

    block = functools.partial(_block, dtype=dtype)
    if block_remat is not None:
        # scan already keeps XLA from CSE-ing the recomputation away, so prevent_cse is only needed unrolled.
        block = jax.checkpoint(block, policy=block_remat, prevent_cse=not scan_layers)

    blocks = params["blocks"]
    if scan_layers:
        if not _is_stacked(blocks):
            raise ValueError("scan_layers=True needs stacked blocks: use init(..., scan_layers=True) "
                             "or stack_blocks(params)")

        def body(x, p):
            with jax.named_scope("block"):
                return block(p, x), None

        x, _ = lax.scan(body, x, blocks)
    else:
        layers = unstack_blocks(params)["blocks"]
        for i, p in enumerate(layers):
            with jax.named_scope(f"block{i}"):
                x = block(p, x)

    x = layernorm(params["ln_f"], x)
    w_out = params["w_out"] if "w_out" in params else params["wte"].T
    return _dense(x, w_out, dtype)


def loss(params, batch, *, dtype=jnp.float32, scan_layers=False, block_remat=None):
    """Next-token cross-entropy (float32 scalar); batch = (inputs, targets), both int [B, T]."""
    inputs, targets = batch
    logits = apply(params, inputs, dtype=dtype, scan_layers=scan_layers, block_remat=block_remat)
    return _common.cross_entropy(logits, targets)


def example_batch(key, batch=2, seq_len=16, vocab=64, n_layers=None, d_model=None, n_heads=None):
    """(inputs, targets) int32 [batch, seq_len]: random tokens and the same stream shifted by one.

    `n_layers`, `d_model`, `n_heads` are ignored; they let `example_batch(key, **SIZES)` work.
    """
    del n_layers, d_model, n_heads
    tokens = jax.random.randint(key, (batch, seq_len + 1), 0, vocab, jnp.int32)
    return tokens[:, :-1], tokens[:, 1:]


# ----------------------------------------------------------------------------- training


def optimizer(learning_rate=1e-3):
    """Default optimizer: Adam."""
    return optax.adam(learning_rate)


def init_opt_state(params):
    """State of the default `optimizer()` for `params` (stacked or not)."""
    return optimizer().init(params)


def make_train_step(opt, *, dtype=jnp.float32, scan_layers=False, block_remat=None):
    """`train_step(params, opt_state, batch) -> (params, opt_state, loss)` under `opt`.

    The keyword options are forwarded to `loss`.
    """
    loss_fn = functools.partial(loss, dtype=dtype, scan_layers=scan_layers, block_remat=block_remat)
    return _common.make_train_step(loss_fn, opt)


train_step = make_train_step(optimizer())
