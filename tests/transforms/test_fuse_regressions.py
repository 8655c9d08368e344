"""Regressions from the fusion audit: dtypes, dot precision, forward mode, labels, mask order.

Each test compares the fused program with the unfused one (outputs and gradients) and
checks that the fusion fired, or that it left the candidate alone and said why.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import graphopt
from graphopt import analysis, ir, testing
from graphopt.passes import PassContext, resolve
from graphopt.transforms import fuse  # noqa: F401

R = np.random.default_rng(7)
XOPT = dict(xent_min_bytes=1, xent_chunk=64)   # V=200: 4 chunks, the last one padded
HIGHEST = lax.Precision.HIGHEST


def arr(*shape, dtype=jnp.float32):
    return jnp.asarray(R.normal(size=shape), dtype)


def logprob(h, w, y, mode=None, precision=None):
    logp = jax.nn.log_softmax(jnp.matmul(h, w, precision=precision))
    return jnp.take_along_axis(logp, y[:, None], axis=-1, mode=mode)[:, 0]


def xent(h, w, y):
    return -jnp.mean(logprob(h, w, y))


def attention(q, k, v, mask=None, bias=None, fill=-1e30, precision=None, causal=False):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision) / 2.0
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = jnp.where(mask, s, fill)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision=precision)


def attn_hits(stats):
    return sum(n for k, n in stats.hits.items() if k.startswith("fuse.attention"))


def float_dtypes(cj):
    return {np.dtype(a.aval.dtype) for e, _, _ in ir.walk_eqns(cj) for a in e.outvars
            if jnp.issubdtype(a.aval.dtype, jnp.floating)}


# ------------------------------------------------------------------ 4: float64 stays float64

def test_xent_float64_computed_in_float64():
    with jax.enable_x64(True):   # scoped: x64 does not leak into other tests
        h, w = arr(16, 8, dtype=jnp.float64), arr(8, 200, dtype=jnp.float64)
        y = jnp.asarray(R.integers(0, 200, 16), jnp.int32)
        r = testing.check_pass("fuse_cross_entropy", xent, h, w, y, options=XOPT)
        assert r.stats.hits["fuse.cross_entropy"] == 1
        assert float_dtypes(r.jaxpr) == {np.dtype(np.float64)}   # no float32 step anywhere


def test_attention_float64_computed_in_float64():
    with jax.enable_x64(True):
        q, k, v = (arr(2, n, 3, 4, dtype=jnp.float64) for n in (5, 6, 6))
        mask = jnp.asarray(R.random((2, 3, 5, 6)) > 0.3)
        bias = arr(2, 3, 5, 6, dtype=jnp.float64)
        r = testing.check_pass("fuse_attention", attention, q, k, v, mask, bias)
        assert attn_hits(r.stats) == 1 and float_dtypes(r.jaxpr) == {np.dtype(np.float64)}
        # Causal, long enough for the block-causal kernel (the CPU default's choice).
        q, k, v = (arr(1, 128, 2, 4, dtype=jnp.float64) for _ in range(3))
        r = testing.check_pass("fuse_attention_auto", lambda q, k,
                               v: attention(q, k, v, causal=True), q, k, v)
        assert r.stats.hits["fuse.attention.causal"] == 1 and float_dtypes(r.jaxpr) == {np.dtype(np.float64)}


# --------------------------------------------------------- 5: the dots' precision is kept

def dot_params(cj):
    return [(e.params["precision"], e.params.get("preferred_element_type"), e.outvars[0].aval.dtype)
            for e, _, _ in ir.walk_eqns(cj) if e.primitive.name == "dot_general"]


def test_attention_keeps_dot_precision():
    q, k, v = arr(2, 5, 3, 4), arr(2, 6, 3, 4), arr(2, 6, 3, 4)
    f = lambda q, k, v: attention(q, k, v, precision=HIGHEST)  # noqa: E731
    r = testing.check_pass("fuse_attention", f, q, k, v)
    assert attn_hits(r.stats) == 1
    assert all(p == (HIGHEST, HIGHEST) for p, _, _ in dot_params(r.jaxpr))
    # The block-causal kernel (T=128) keeps it too.
    q, k, v = (arr(1, 128, 2, 4) for _ in range(3))
    f = lambda q, k, v: attention(q, k, v, precision=HIGHEST, causal=True)  # noqa: E731
    r = testing.check_pass("fuse_attention_auto", f, q, k, v)
    assert r.stats.hits["fuse.attention.causal"] == 1
    assert len(dot_params(r.jaxpr)) == 4 and all(p == (HIGHEST, HIGHEST) for p, _, _ in dot_params(r.jaxpr))


def test_attention_precision_keeps_cudnn_out_and_says_why():
    # On GPU, bf16 attention would go to cuDNN, which takes no precision: graphopt's kernel.
    q, k, v = (arr(2, 8, 2, 8, dtype=jnp.bfloat16) for _ in range(3))
    cj = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, precision=HIGHEST))(q, k, v)
    (p,) = resolve("fuse_attention")
    res = p(cj, PassContext(platform="gpu"))
    assert dict(res.stats.hits) == {"fuse.attention": 1}      # not fuse.attention.cudnn
    assert any("cuDNN not used" in n and "precision" in n for n in res.stats.notes)
    assert all(p == (HIGHEST, HIGHEST) for p, _, _ in dot_params(res.jaxpr))


def test_attention_keeps_the_pv_dot_output_type():
    # bf16 probabilities·v accumulated into float32 stays float32 (was rounded to bf16).
    q, k, v = (arr(2, 8, 2, 8, dtype=jnp.bfloat16) for _ in range(3))

    def f(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v,
                          preferred_element_type=jnp.float32)
    r = testing.check_pass("fuse_attention", f, q, k, v, rtol=2e-2)
    assert attn_hits(r.stats) == 1 and r.jaxpr.out_avals[0].dtype == jnp.float32
    assert not [d for d in dot_params(r.jaxpr) if d[2] == jnp.bfloat16]   # no bf16-rounded dot


def test_xent_keeps_dot_precision():
    h, w, y = arr(16, 8), arr(8, 200), jnp.asarray(R.integers(0, 200, 16), jnp.int32)
    f = lambda h, w, y: logprob(h, w, y, precision=HIGHEST)  # noqa: E731
    r = testing.check_pass("fuse_cross_entropy", f, h, w, y, options=XOPT)
    assert r.stats.hits["fuse.cross_entropy"] == 1    # was left unfused, silently
    assert dot_params(r.jaxpr) and all(p == (HIGHEST, HIGHEST) for p, _, _ in dot_params(r.jaxpr))


# ------------------------------------------------------------------- 9: forward-mode AD

@pytest.mark.slow  # over 25 s on 2 cores: leg 1 only (.ci/run)
def test_xent_forward_mode_and_grad_without_full_logits():
    h, w = arr(256, 16), arr(16, 2048)
    y = jnp.asarray(R.integers(0, 2048, 256), jnp.int32)
    fast = graphopt.optimize(xent, passes=["fuse_cross_entropy"], xent_min_bytes=1, xent_chunk=256)
    assert fast.report(h, w, y).hits()["fuse.cross_entropy"] == 1
    th, tw = arr(256, 16), arr(16, 2048)
    a = jax.jvp(lambda h, w: xent(h, w, y), (h, w), (th, tw))
    b = jax.jvp(lambda h, w: fast(h, w, y), (h, w), (th, tw))
    for x, z in zip(a, b):
        assert testing.max_rel_error(x, z) < 1e-5
    small = (arr(8, 4), arr(4, 200), jnp.asarray(R.integers(0, 200, 8), jnp.int32))
    fs = graphopt.optimize(xent, passes=["fuse_cross_entropy"], **XOPT)
    for jac in (jax.jacfwd, jax.hessian):    # forward over forward, forward over reverse
        for x, z in zip(jax.tree.leaves(jac(xent, argnums=(0, 1))(*small)),
                        jax.tree.leaves(jac(fs, argnums=(0, 1))(*small))):
            assert testing.max_rel_error(x, z) < 1e-5
    # Reverse mode still never holds the [tokens, V] logits: not in the jaxpr, not in XLA.
    g, gf = jax.grad(xent, argnums=(0, 1)), jax.grad(fast, argnums=(0, 1))
    for x, z in zip(g(h, w, y), gf(h, w, y)):
        assert testing.max_rel_error(x, z) < 1e-5
    big = [e.primitive.name for e, _, _ in ir.walk_eqns(jax.make_jaxpr(gf)(h, w, y))
           if any(np.prod(o.aval.shape) >= 256 * 2048 for o in e.outvars)]
    assert not big
    temp = {name: analysis.xla_memory(fn, h, w, y)["temp_bytes"] for name, fn in (("g", g), ("gf", gf))}
    assert temp["gf"] < temp["g"] / 2


def test_block_causal_attention_forward_mode():
    q, k, v = (arr(1, 128, 2, 4) for _ in range(3))
    f = lambda q, k, v: attention(q, k, v, causal=True)  # noqa: E731
    fast = graphopt.optimize(f, passes=["fuse_attention_auto"])
    assert fast.report(q, k, v).hits()["fuse.attention.causal"] == 1
    t = tuple(arr(1, 128, 2, 4) for _ in range(3))
    for x, z in zip(jax.jvp(f, (q, k, v), t), jax.jvp(fast, (q, k, v), t)):
        assert testing.max_rel_error(x, z) < 1e-5


# ------------------------------------------------------------- bf16, weak types, labels

def test_xent_bf16_keeps_dtype_and_is_no_less_accurate():
    h, w = arr(16, 8, dtype=jnp.bfloat16), arr(8, 200, dtype=jnp.bfloat16)
    y = jnp.asarray(R.integers(0, 200, 16), jnp.int32)
    r = testing.check_pass("fuse_cross_entropy", logprob, h, w, y, rtol=2e-2, options=XOPT)
    assert r.stats.hits["fuse.cross_entropy"] == 1
    assert r.jaxpr.out_avals == r.before.out_avals     # dtype bf16 and weak type as the original
    ref = logprob(h.astype(jnp.float32), w.astype(jnp.float32), y)
    fused = ir.eval_jaxpr(r.jaxpr, h, w, y)[0]
    assert testing.max_rel_error(ref, fused) <= testing.max_rel_error(ref, logprob(h, w, y)) + 1e-3


LABELS = np.array([0, 199, 200, 255, -1, -200, -201, 7, 127, 128, 300, 3, 65, 66, 67, 68])


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32",
                                   "int64", "uint64"])
def test_xent_label_dtypes_and_out_of_range_labels(dtype):
    def f(h, w, y):   # None: take_along_axis's default, "fill"
        return [logprob(h, w, y, mode=m) for m in (None, "clip", "promise_in_bounds")]
    with jax.enable_x64(dtype.endswith("64")):
        y = jnp.asarray(LABELS.astype(dtype))    # wraps for unsigned / int8, as a user's would
        r = testing.check_pass("fuse_cross_entropy", f, arr(16, 8), arr(8, 200), y, options=XOPT)
        assert r.stats.hits["fuse.cross_entropy"] == 3


def test_xent_gather_with_narrow_label_dtype():
    # lax.gather straight on int8 labels with V=200 > 127 (take_along_axis widens to int32).
    dn = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(1,), start_index_map=(1,),
                                    operand_batching_dims=(0,), start_indices_batching_dims=(0,))

    def f(h, w, y):
        return lax.gather(jax.nn.log_softmax(h @ w), y[:, None], dn, (1, 1), mode="fill")
    y = jnp.asarray(LABELS.astype("int8"))
    r = testing.check_pass("fuse_cross_entropy", f, arr(16, 8), arr(8, 200), y, options=XOPT)
    assert r.stats.hits["fuse.cross_entropy"] == 1


# ------------------------------------------------------- masks, biases and their order

def test_attention_mask_then_bias_on_an_emptied_row():
    # where(mask, s, -1e9) + bias: on a row the mask empties, the bias decides (the fill
    # absorbs it only partly in float32); dot_product_attention masks after the bias.
    q, k, v = arr(2, 5, 3, 4), arr(2, 6, 3, 4), arr(2, 6, 3, 4)
    mask = jnp.asarray(R.random((2, 3, 5, 6)) > 0.3).at[:, :, 1].set(False)
    bias = 100 * arr(2, 3, 5, 6)

    def f(q, k, v, mask, bias):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        s = jnp.where(mask, s, -1e9) + bias
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    r = testing.check_pass("fuse_attention", f, q, k, v, mask, bias)
    assert attn_hits(r.stats) == 1


def test_attention_causal_and_padding_masks_with_different_fills():
    # Left padding empties the first rows under the causal mask; such a row's weights come
    # from the two fills (-1e9 beats -1e30), not uniform over all keys as is_causal gives.
    q, k, v = (arr(2, 8, 3, 4) for _ in range(3))
    pad = jnp.ones((2, 1, 1, 8), bool).at[..., :2].set(False)
    causal = jnp.tril(jnp.ones((8, 8), bool))
    for first, second, f1, f2 in ((causal, None, -1e30, -1e9), (None, causal, -1e9, -1e30)):

        def f(q, k, v, pad):
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
            s = jnp.where(pad if first is None else first, s, f1)  # noqa: B023
            s = jnp.where(pad if second is None else second, s, f2)  # noqa: B023
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
        r = testing.check_pass("fuse_attention", f, q, k, v, pad)
        assert attn_hits(r.stats) == 1


def test_attention_neg_inf_fill_left_alone_with_a_note():
    q, k, v = arr(2, 5, 3, 4), arr(2, 6, 3, 4), arr(2, 6, 3, 4)
    mask = jnp.asarray(R.random((2, 3, 5, 6)) > 0.3)
    r = testing.check_pass("fuse_attention", lambda q, k, v,
                           m: attention(q, k, v, m, fill=-jnp.inf), q, k, v, mask,
                           expect_change=False)
    assert not r.stats.hits and any("-inf mask fill may empty a row" in n for n in r.stats.notes)


@pytest.mark.parametrize("name", ["fuse_attention", "fuse_batchnorm", "fuse_cross_entropy",
                                  "fuse_matmul_chain", "fuse_parallel_dots", "user_rewrites"])
def test_each_fusion_has_its_documented_off_switch(name):
    """``fuse_x=False`` is a valid option that switches the pass off, and says so;
    anything but a bool is an error naming the option."""
    f = graphopt.optimize(lambda x: jnp.tanh(x @ x), passes=[name], **{name: False})
    x = jnp.ones((4, 4))
    rep = f.report(x)
    assert not rep.records[0].changed
    assert f"{name}: switched off by option {name}=False" in rep.notes()
    with pytest.raises(graphopt.OptionError, match=name):
        graphopt.optimize(lambda x: x, **{name: "no"})
