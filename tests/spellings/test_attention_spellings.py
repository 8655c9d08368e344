"""Attention spelling corpus: every way a user writes attention fuses (pre-AD).

Each case is a loss over one attention spelling, decorated with
``graphopt.optimize(passes=["prune", "fuse_attention"])`` and differentiated outside.
It asserts that the fusion fired, that outputs and gradients equal the unfused loss's,
and what the fusion removes: causal attention without another mask runs block-causal on
CPU, so no [T, S] scores exist anywhere in the optimized program; masked or non-causal
attention runs XLA's attention, so the hand-written scores chain is gone from the
program's own equations and only the fused call computes scores.
"""
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import graphopt
from graphopt import ir
from graphopt.patterns import is_fused_call

# compiles two gradient programs per case: the slow tier (CI's JAX 0.11 leg runs the fast one)
pytestmark = pytest.mark.slow

B, T, N, H = 1, 128, 2, 8   # T = 128: two 64-row blocks, the block-causal kernel's minimum
D = N * H
R = np.random.default_rng(0)
CAUSAL = np.tril(np.ones((T, T), bool))


def arr(*shape, dtype=jnp.float32):
    return jnp.asarray(R.normal(size=shape), dtype)


X = arr(B, T, D)
Q, K, V = arr(B, T, N, H), arr(B, T, N, H), arr(B, T, N, H)
PAD = jnp.asarray(np.arange(T)[None, :] < np.array([[T - 17]]))   # [B, S] key padding


def softmax_attn(q, k, v, mask=None, bias=None, fill=-1e30):
    """Hand-written, heads last ([B, T, N, H]), scale after the dot."""
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = jnp.where(mask, s, fill)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v)


# ---------------------------------------------------------------- the spellings
# Each: () -> (loss, args, block_wise). loss(*args) is a scalar; args[0] is differentiated
# along with every other float argument.

def linen_mha():
    m = linen.MultiHeadDotProductAttention(num_heads=N, qkv_features=D)
    mask = linen.make_causal_mask(jnp.ones((B, T)))
    params = m.init(jax.random.PRNGKey(0), X, X, mask=mask)
    return (lambda p, x: jnp.sum(m.apply(p, x, x, mask=mask) ** 2)), (params, X), True


def _nnx(mask):
    m = nnx.MultiHeadAttention(num_heads=N, in_features=D, qkv_features=D, decode=False,
                               rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x, mask=mask) ** 2)
    return loss, (params, X)


def nnx_mha_causal():
    return (*_nnx(nnx.make_causal_mask(jnp.ones((B, T)))), True)


def nnx_mha_padding_mask():
    return (*_nnx(nnx.make_attention_mask(jnp.ones((B, T), bool), PAD)), False)


def equinox_mha():
    m = eqx.nn.MultiheadAttention(num_heads=N, query_size=D, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(m, eqx.is_array)
    mask = jnp.asarray(CAUSAL)

    def loss(params, x):
        mm = eqx.combine(params, static)
        return jnp.sum(jax.vmap(lambda xi: mm(xi, xi, xi, mask=mask))(x) ** 2)
    return loss, (params, X), True


def haiku_einsum():
    # haiku.MultiHeadAttention's own einsums, scale after the dot, -1e30 fill.
    def attn(q, k, v):
        logits = jnp.einsum("...thd,...Thd->...htT", q, k) / np.sqrt(H).astype(q.dtype)
        logits = jnp.where(CAUSAL, logits, -1e30)
        w = jax.nn.softmax(logits)
        return jnp.einsum("...htT,...Thd->...thd", w, v)
    return (lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v)))), (Q, K, V), True


def heads_first_iota_mask():
    # [B, N, T, H], q scaled before the dot, causal mask built from iotas in the program.
    def attn(q, k, v):
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        s = (q * H ** -0.5) @ jnp.swapaxes(k, -1, -2)
        i = jnp.arange(T)
        s = jnp.where(i[:, None] >= i[None, :], s, jnp.finfo(s.dtype).min)
        e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
        return jnp.swapaxes((e / e.sum(-1, keepdims=True)) @ v, 1, 2)
    return (lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v)))), (Q, K, V), True


def additive_causal_mask():
    # The mask as a constant added to the scores: 0 where kept, -1e9 elsewhere.
    add = jnp.where(jnp.asarray(CAUSAL), 0.0, -1e9)
    return (lambda q, k, v: jnp.sum(jnp.tanh(softmax_attn(q, k, v, bias=add)))), (Q, K, V), True


def boolean_mask_argument():
    # A padding mask passed in: not causal, so XLA's attention (not block-wise).
    mask = jnp.broadcast_to(PAD[:, None, None, :], (B, 1, T, T))
    return (lambda q, k, v, m: jnp.sum(jnp.tanh(softmax_attn(q, k, v, mask=m)))), (Q, K, V, mask), False


def learned_bias_and_causal():
    # A differentiable bias (relative-position style) under a causal mask.
    bias = arr(N, T, T) * 0.1
    return (lambda q, k, v, b: jnp.sum(jnp.tanh(softmax_attn(q, k, v, mask=CAUSAL, bias=b)))), \
        (Q, K, V, bias), True


def gqa_repeat():
    # Grouped-query attention: 2 query heads per key/value head, kv heads jnp.repeat'ed.
    q = arr(B, T, 4, H)
    def attn(q, k, v):
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        return softmax_attn(q, k, v, mask=CAUSAL)
    return (lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v)))), (q, K, V), True


def gqa_reshaped_groups():
    # Grouped-query attention with the query heads reshaped into [kv head, group].
    q = arr(B, T, 4, H)
    def attn(q, k, v):
        qg = q.reshape(B, T, N, 2, H)
        s = jnp.einsum("btkgh,bskh->bkgts", qg, k) * H ** -0.5
        s = jnp.where(CAUSAL, s, -1e9)
        o = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(s), v)
        return o.reshape(B, T, 4, H)
    return (lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v)))), (q, K, V), True


def mqa_single_kv_head():
    def attn(q, k, v):
        s = jnp.einsum("btnh,bsh->bnts", q, k) * H ** -0.5
        s = jnp.where(CAUSAL, s, -1e9)
        return jnp.einsum("bnts,bsh->btnh", jax.nn.softmax(s), v)
    return (lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v)))), (Q, K[:, :, 0], V[:, :, 0]), True


def bf16_dots_f32_softmax():
    # bf16 q, k, v; scores in float32 (preferred_element_type), softmax in float32,
    # probabilities cast back to bf16 for the second dot.
    def attn(q, k, v):
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
        s = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * H ** -0.5
        s = jnp.where(CAUSAL, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(jnp.bfloat16)
        return jnp.einsum("bnts,bsnh->btnh", p, v).astype(jnp.float32)
    return (lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v)))), (Q, K, V), True


def jax_nn_xla_attention():
    # jax.nn.dot_product_attention's XLA path (what flax nnx calls): re-fused block-causal.
    return (lambda q, k, v: jnp.sum(jnp.tanh(jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla")))), (Q, K, V), True


def vmapped_per_head():
    # Per-head 2-D code under vmap (equinox's own spelling, written by hand).
    def head(q, k, v):
        s = q @ k.T / math.sqrt(H)
        return jax.nn.softmax(jnp.where(CAUSAL, s, -1e9)) @ v
    attn = jax.vmap(jax.vmap(head, in_axes=1, out_axes=1))
    return (lambda q, k, v: jnp.sum(jnp.tanh(attn(q, k, v)))), (Q, K, V), True


SPELLINGS = [linen_mha, nnx_mha_causal, nnx_mha_padding_mask, equinox_mha, haiku_einsum,
             heads_first_iota_mask, additive_causal_mask, boolean_mask_argument,
             learned_bias_and_causal, gqa_repeat, gqa_reshaped_groups, mqa_single_kv_head,
             bf16_dots_f32_softmax, jax_nn_xla_attention, vmapped_per_head]
RTOL = {bf16_dots_f32_softmax: 3e-2}


# ---------------------------------------------------------------- checks

def scores_eqns(cj, top_level_only=False):
    """The scores and their exponentials: dot_general and exp results with two axes of
    length T = S (biases and masks the user passes in are [T, S] by nature)."""
    eqns = cj.jaxpr.eqns if top_level_only else [e for e, _, _ in ir.walk_eqns(cj)]
    return [e for e in eqns if e.primitive.name in ("dot_general", "exp")
            and list(e.outvars[0].aval.shape).count(T) >= 2]


def assert_close_tree(ref, got, rtol):
    """Leaf by leaf, relative to the largest value of the whole tree (gradients that are
    zero in exact arithmetic, like a key bias's, are rounding noise in both programs)."""
    ref, got = jax.tree.leaves(ref), jax.tree.leaves(got)
    scale = max(float(jnp.max(jnp.abs(r))) for r in ref)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda f: f.__name__)
def test_spelling_fuses_pre_ad(spelling):
    loss, args, block_wise = spelling()
    opt = graphopt.optimize(loss, passes=["prune", "fuse_attention"])
    report = opt.report(*args)
    fused = {k: n for k, n in report.hits().items() if k.startswith("fuse.attention")}
    assert sum(fused.values()) == 1, (report.hits(), report.notes())
    assert ("fuse.attention.causal" in fused) == block_wise, fused
    # Outputs and gradients (every float argument) equal the unfused loss's.
    rtol = RTOL.get(spelling, 1e-5)
    argnums = tuple(n for n, a in enumerate(args)   # every float argument
                    if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(a)))
    ref = jax.jit(jax.value_and_grad(loss, argnums=argnums))(*args)
    got = jax.jit(jax.value_and_grad(opt, argnums=argnums))(*args)
    assert_close_tree(ref, got, rtol)
    before, after = opt.original_jaxpr(*args), opt.jaxpr(*args)
    assert scores_eqns(before, top_level_only=True)       # the hand-written scores were there
    assert not scores_eqns(after, top_level_only=True)    # ... and are gone from the program
    assert any(is_fused_call(e) for e in after.jaxpr.eqns)
    if spelling is gqa_repeat:  # the kernel takes the 2 key/value heads, not their repeats
        assert not [e for e in after.jaxpr.eqns if e.primitive.name == "broadcast_in_dim"
                    and e.outvars[0].aval.shape == (B, T, N, 2, H)]
        assert [e for e in before.jaxpr.eqns if e.primitive.name == "broadcast_in_dim"
                and e.outvars[0].aval.shape == (B, T, N, 2, H)]
    if block_wise:  # block-causal: no [T, S] value anywhere, fused kernel included
        assert not scores_eqns(after), [str(e)[:120] for e in scores_eqns(after)][:3]
        # ... and none in the backward pass JAX derives from it either.
        grad_jaxpr = jax.make_jaxpr(jax.grad(opt, argnums=argnums))(*args)
        assert scores_eqns(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(*args))
        assert not scores_eqns(grad_jaxpr)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda f: f.__name__)
def test_spelling_fuses_post_ad(spelling):
    """The training step decorated (value_and_grad inside): the loss is fused before AD,
    outputs and gradients equal the step as written, and a block-causal spelling leaves
    no [T, S] value anywhere in the step, forward or backward."""
    loss, args, block_wise = spelling()
    argnums = tuple(n for n, a in enumerate(args)
                    if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(a)))
    step = lambda *a: jax.value_and_grad(loss, argnums=argnums)(*a)   # grad taken inside
    opt = graphopt.optimize(step, passes=["prune", "fuse_attention"])
    report = opt.report(*args)
    first = report.records[0]
    assert first.name == "fuse_before_ad", report.notes()
    assert sum(n for k, n in first.stats.hits.items() if k.startswith("fuse.attention")) == 1
    assert_close_tree(jax.jit(step)(*args), opt(*args), RTOL.get(spelling, 1e-5))
    assert scores_eqns(report.original)
    if block_wise:
        assert not scores_eqns(opt.jaxpr(*args))
