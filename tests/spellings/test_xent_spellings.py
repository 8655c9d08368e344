"""Cross-entropy spelling corpus: every spelling fuses pre-AD (loss decorated, jax.grad
outside), gives the unfused outputs and gradients, and leaves no [tokens, V] value in
the optimized program (forward or its gradient); bad inputs give what the unfused
program gives."""
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jax
import jax.numpy as jnp
import optax

import graphopt
from graphopt import ir, testing

sys.path.insert(0, os.path.dirname(__file__))
from corpus import SPELLINGS  # noqa: E402

# compiles two gradient programs per case: the slow tier (CI's JAX 0.11 leg runs the fast one)
pytestmark = pytest.mark.slow

B, T, D, V = 2, 12, 16, 100          # V = 100 with chunks of 32: 4 chunks, the last one padded
OPTS = dict(passes=["prune", "fuse_cross_entropy"], xent_min_bytes=0, xent_chunk=32)


def data(seed=0, label_dtype=jnp.int32):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (B, T, D))
    w = jax.random.normal(k[1], (D, V)) * 0.3
    b = jax.random.normal(k[2], (V,))
    y = jax.random.randint(k[3], (B, T), 0, V).astype(label_dtype)
    return h, w, b, y


def big_vars(cj, rows=B * (T - 1)):
    """Vars of shape [..., V] with at least ``rows`` rows, nested jaxprs included."""
    out = []
    for e, _, _ in ir.walk_eqns(cj):
        for v in e.outvars:
            s = getattr(v.aval, "shape", ())
            if len(s) >= 2 and s[-1] == V and int(np.prod(s[:-1])) >= rows:
                out.append(f"{e.primitive.name}: {s}")
    return out


def fused(f, *args, hits=None):
    g = graphopt.optimize(f, **OPTS)
    rep = g.report(*args)
    n = rep.hits().get("fuse.cross_entropy", 0)
    assert n >= 1 if hits is None else n == hits, rep.notes()
    return g, rep


def equal(f, g, *inputs, rtol=1e-5):
    """Loss and gradients (h, w, b) as jax.jit(f) gives them, for each input tuple (one
    compile per function: bad inputs are values, not shapes)."""
    both = jax.jit(lambda *a: (jax.value_and_grad(f, argnums=(0, 1, 2))(*a),
                               jax.value_and_grad(g, argnums=(0, 1, 2))(*a)))
    for args in inputs:
        a, c = map(jax.tree.leaves, both(*args))
        for k, (x, z) in enumerate(zip(a, c)):
            err = testing.max_rel_error(x, z)
            assert err <= rtol, (k, err, x if np.ndim(x) == 0 else "", z if np.ndim(z) == 0 else "")


def bad_inputs(h, w, b, y):
    """Labels out of range (both sides), a NaN in one token's hidden state (NaN logits)."""
    y_out = y.at[0, 3].set(V).at[1, 5].set(-1).at[1, 7].set(jnp.iinfo(y.dtype).max)
    return [(h, w, b, y), (h, w, b, y_out), (h.at[1, 4, 2].set(jnp.nan), w, b, y)]


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_fuses_pre_ad(name):
    """Fused, no [tokens, V] value forward or backward, same loss and gradients, also
    for out-of-range labels and NaN logits."""
    f = SPELLINGS[name]
    args = data()
    g, rep = fused(f, *args)
    assert big_vars(jax.make_jaxpr(f)(*args)), "the unfused spelling should hold the logits"
    assert big_vars(g.jaxpr(*args)) == []
    assert big_vars(jax.make_jaxpr(jax.grad(g, argnums=(0, 1, 2)))(*args)) == []
    assert not [n for n in rep.notes() if "cross_entropy" in n and "not applied" in n]
    equal(f, g, *bad_inputs(*args), rtol=2e-2 if name == "cast_logits" else 1e-5)


@pytest.mark.parametrize("name,dtypes", [("optax_integer", ["int8", "uint8", "int16", "uint32"]),
                                         ("optax_one_hot", ["int8", "uint16"])])
def test_label_dtypes(name, dtypes):
    f = SPELLINGS[name]
    for dt in dtypes:
        h, w, b, y = data(label_dtype=dt)
        g, _ = fused(f, h, w, b, y)
        equal(f, g, *bad_inputs(h, w, b, y))


def test_int64_labels_under_x64():
    """int64 / uint64 labels exist only with x64 on (the rest of the program float32):
    fused, and the loss and gradients are the unfused program's, bad labels included."""
    with jax.enable_x64(True):
        for dt in ("int64", "uint64"):
            h, w, b, y = data(label_dtype=dt)
            assert y.dtype == np.dtype(dt)
            f = SPELLINGS["optax_integer"]
            g, _ = fused(f, h, w, b, y)
            equal(f, g, *bad_inputs(h, w, b, y))


def masked_vocab_where(h, w, b, y):
    z = jnp.where(b > -jnp.inf, h @ w, -jnp.inf)
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def one_hot_bias(h, w, b, y):
    return -(jax.nn.one_hot(y, V) * jax.nn.log_softmax(h @ w + b)).sum(-1).mean()


def smoothed_bias(h, w, b, y):
    t = optax.smooth_labels(jax.nn.one_hot(y, V), 0.1)
    return optax.softmax_cross_entropy(h @ w + b, t).mean()


@pytest.mark.parametrize("f", [SPELLINGS["output_bias"], masked_vocab_where, one_hot_bias, smoothed_bias],
                         ids=["additive_bias", "where_mask", "one_hot", "smoothed"])
def test_minus_inf_logits_for_masked_vocabulary(f):
    """-inf logits on banned entries; a label on a banned entry gives +inf as unfused.
    (Smoothed targets put weight on banned entries: +inf everywhere, as unfused.)"""
    h, w, b, y = data()
    banned = (jnp.arange(V) % 7) == 3
    y = jnp.where(banned[y], (y + 1) % V, y)
    bias = jnp.where(banned, -jnp.inf, b)
    g, _ = fused(f, h, w, bias, y)
    equal(f, g, (h, w, bias, y), (h, w, bias, y.at[0, 0].set(3)))


def test_per_token_losses_and_lse_as_outputs():
    def f(h, w, b, y):
        z = h @ w
        lse = jax.nn.logsumexp(z, axis=-1)
        return lse - jnp.take_along_axis(z, y[..., None], -1)[..., 0], lse
    args = data()
    g, _ = fused(f, *args, hits=1)
    testing.assert_equivalent(jax.jit(f), g, *args)
    assert big_vars(g.jaxpr(*args)) == []


def test_logits_read_elsewhere_left_unfused_with_reason():
    def f(h, w, b, y):
        z = h @ w
        acc = (jnp.argmax(z, -1) == y).mean()
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean(), acc
    g, rep = fused(f, *data(), hits=0)
    notes = [n for n in rep.notes() if "cross_entropy" in n]
    assert len(notes) == 1 and "argmax" in notes[0], notes


def test_dense_targets_left_unfused_with_reason():
    def f(h, w, b, t):
        return optax.softmax_cross_entropy(h @ w, t).mean()
    h, w, b, _ = data()
    t = jax.nn.softmax(jax.random.normal(jax.random.key(5), (B, T, V)))
    g, rep = fused(f, h, w, b, t, hits=0)
    assert any("dense targets" in n for n in rep.notes()), rep.notes()


def sgd_step(f):
    """A training step as users write it: value_and_grad of the loss, then an update."""
    def step(h, w, b, y):
        loss, (gh, gw, gb) = jax.value_and_grad(f, argnums=(0, 1, 2))(h, w, b, y)
        return loss, gh, w - 0.1 * gw, b - 0.1 * gb
    return step


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_fuses_post_ad(name):
    """The step decorated: the loss it differentiates is fused before AD, no [tokens, V]
    value is left anywhere in the step, and its outputs are the step's as written."""
    step = sgd_step(SPELLINGS[name])
    args = data()
    g = graphopt.optimize(step, **OPTS)
    rep = g.report(*args)
    assert rep.records[0].name == "fuse_before_ad", rep.notes()
    assert rep.records[0].stats.hits["fuse.cross_entropy"] >= 1, rep.notes()
    assert big_vars(rep.original)
    assert big_vars(g.jaxpr(*args)) == []
    rtol = 2e-2 if name == "cast_logits" else 1e-5
    for x, z in zip(jax.jit(step)(*args), g(*args)):
        assert testing.max_rel_error(x, z) <= rtol, name


def test_post_ad_step_says_which_condition_failed():
    step = sgd_step(SPELLINGS["optax_integer"])   # reached only before AD: switched off here
    g = graphopt.optimize(step, fuse_before_ad=False, **OPTS)
    rep = g.report(*data())
    assert rep.hits().get("fuse.cross_entropy", 0) == 0
    notes = [n for n in rep.notes() if "cross_entropy" in n and "not applied" in n]
    # The first backward equation reading the softmax is named, with the fix.
    assert notes and "[rows, 100]" in notes[0] and "before jax.grad" in notes[0], rep.notes()
    notes = [n for n in rep.notes() if "cross_entropy" in n and "not applied" in n]
    # The first backward equation reading the softmax is named, with the fix.
    assert notes and "[rows, 100]" in notes[0] and "before jax.grad" in notes[0], rep.notes()


def test_forward_mode_through_the_normal_form():
    f = SPELLINGS["label_smoothing"]
    h, w, b, y = data()
    g, _ = fused(f, h, w, b, y)
    th, tw = jax.random.normal(jax.random.key(7), h.shape), jax.random.normal(jax.random.key(8), w.shape)
    a = jax.jvp(lambda h, w: f(h, w, b, y), (h, w), (th, tw))
    c = jax.jvp(lambda h, w: g(h, w, b, y), (h, w), (th, tw))
    for x, z in zip(a, c):
        assert testing.max_rel_error(x, z) < 1e-5


_PROP = {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=hnp.arrays(np.int32, (B, T), elements=st.integers(-3, V + 3)),
       banned=hnp.arrays(np.bool_, (V,), elements=st.booleans()),
       name=st.sampled_from(["output_bias", "one_hot_bias", "smoothed_bias"]))
def test_property_labels_and_vocabulary_masks(labels, banned, name):
    """Any labels (out of range included) and any -inf vocabulary mask: loss and
    gradients as unfused (one compile per spelling, examples are values)."""
    f = {"output_bias": SPELLINGS["output_bias"], "one_hot_bias": one_hot_bias,
         "smoothed_bias": smoothed_bias}[name]
    h, w, b, y = data()
    if name not in _PROP:
        g, _ = fused(f, h, w, b, y)
        _PROP[name] = jax.jit(lambda *a: (jax.value_and_grad(f, argnums=(0, 1, 2))(*a),
                                          jax.value_and_grad(g, argnums=(0, 1, 2))(*a)))
    bias = jnp.where(jnp.asarray(banned), -jnp.inf, b)
    a, c = map(jax.tree.leaves, _PROP[name](h, w, bias, jnp.asarray(labels)))
    for x, z in zip(a, c):
        assert testing.max_rel_error(x, z) <= 1e-5
