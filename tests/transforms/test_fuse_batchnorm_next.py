"""Batch norm after the activation folded into the next dense/conv (fuse.batchnorm_fold_next)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt import ir, testing
from graphopt.models import gpt
from graphopt.transforms import fuse  # noqa: F401

R = np.random.default_rng(0)
NEXT = "fuse.batchnorm_fold_next"
B, C, F = 16, 6, 4  # batch, BN channels, next layer's outputs (distinct: counts by shape)


def arr(*shape, pos=False):
    a = R.random(shape) + 0.5 if pos else R.normal(size=shape)
    return jnp.asarray(a, jnp.float32)


def n_prims(j, name, shape):
    return sum(1 for e, _, _ in ir.walk_eqns(j) if e.primitive.name == name
               and tuple(e.outvars[0].aval.shape) == shape)


def _bn(h, mean, var, scale, bias):
    return (h - mean) / jnp.sqrt(var + 1e-5) * scale + bias


def _mlp(x, w1, w2, mean, var, scale, bias):
    return _bn(jax.nn.gelu(x @ w1), mean, var, scale, bias) @ w2


def _mlp_args():
    return arr(B, 8), arr(8, C), arr(C, F), arr(C), arr(C, pos=True), arr(C), arr(C)


def test_dense_gelu_bn_dense_folds():
    r = testing.check_pass("fuse_batchnorm", _mlp, *_mlp_args())
    assert r.stats.hits[NEXT] == 1 and not r.stats.notes
    act = (B, C)  # the batch norm's per-activation sub / div / mul are gone
    assert n_prims(r.before, "sub", act) == 1 and n_prims(r.jaxpr, "sub", act) == 0
    assert n_prims(r.before, "div", act) == 1 and n_prims(r.jaxpr, "div", act) == 0
    assert n_prims(r.before, "mul", act) - n_prims(r.jaxpr, "mul", act) == 1
    assert n_prims(r.before, "add", act) - n_prims(r.jaxpr, "add", act) == 1


_STEP = st.sampled_from(["add", "radd", "sub", "rsub", "mul", "rmul", "div", "neg", "scalar_mul",
                         "full_rank_bcast_add"])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_STEP, min_size=0, max_size=3), st.booleans())
@example(["full_rank_bcast_add", "rsub", "div"], True)
def test_any_per_channel_chain_on_either_dot_side(steps, rhs):
    """Any affine chain with a per-channel scale folds, the activation as either dot operand."""
    steps = ["mul"] + steps  # a per-channel scale makes it a batch norm candidate
    vs = [arr(C, pos=True) for _ in steps]

    def f(x, w, *vs):
        y = jnp.tanh(x)
        for s, v in zip(steps, vs):
            y = {"add": lambda: y + v, "radd": lambda: v + y, "sub": lambda: y - v,
                 "rsub": lambda: v - y, "mul": lambda: y * v, "rmul": lambda: v * y,
                 "div": lambda: y / v, "neg": lambda: -y, "scalar_mul": lambda: 2.0 * y,
                 "full_rank_bcast_add": lambda: y + jax.lax.broadcast_in_dim(
                     v.reshape(1, C), (B, C), (0, 1))}[s]()
        if rhs:  # the activation as the dot's right operand, contracted on its channels
            return jax.lax.dot_general(w.T, y, (((1,), (1,)), ((), ())))
        return y @ w
    r = testing.check_pass("fuse_batchnorm", f, arr(B, C), arr(C, F), *vs)
    assert r.stats.hits[NEXT] == 1


class _Net(nn.Module):
    """conv → relu → batch norm → conv, as flax linen writes it."""
    pad: str = "VALID"
    train: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        x = nn.BatchNorm(use_running_average=not self.train)(x)
        return nn.Conv(5, (3, 3), padding=self.pad)(x)


def _flax(pad="VALID", train=False):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    m = _Net(pad, train)
    # Shapes only (no init compiles); non-trivial parameters and positive running variances.
    v = jax.tree.map(lambda a: jnp.asarray(R.random(a.shape) + 0.3, a.dtype),
                     jax.eval_shape(m.init, jax.random.PRNGKey(0), x))
    if train:
        return (lambda v, x: m.apply(v, x, mutable=["batch_stats"])[0]), v, x
    return m.apply, v, x


def test_flax_linen_conv_relu_bn_conv_folds():
    f, v, x = _flax()
    r = testing.check_pass("fuse_batchnorm", f, v, x)
    assert r.stats.hits[NEXT] == 1 and not r.stats.notes
    act = (2, 6, 6, 4)
    for prim in ("sub", "mul"):
        assert n_prims(r.before, prim, act) == 1 and n_prims(r.jaxpr, prim, act) == 0
    assert n_prims(r.jaxpr, "conv_general_dilated", (2, 4, 4, 5)) == 1
    # The default pipeline of graphopt.optimize applies it too, outputs unchanged.
    opt = graphopt.optimize(f)
    assert testing.max_rel_error(opt(v, x), ir.eval_jaxpr(r.before, *jax.tree_util.tree_leaves((v, x)))[0]) < 1e-5
    assert opt.report(v, x).hits()[NEXT] == 1


def test_scale_only_folds_into_a_same_padded_conv():
    """Zero padding times a scale is still zero: without a shift any conv takes it."""
    def f(x, w, s):
        y = jax.nn.relu(x) * s
        return jax.lax.conv_general_dilated(y, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    r = testing.check_pass("fuse_batchnorm", f, arr(2, 6, 6, 4), arr(3, 3, 4, 5), arr(4))
    assert r.stats.hits[NEXT] == 1


def _refused(fn, *args):
    r = testing.check_pass("fuse_batchnorm", fn, *args, expect_change=False)
    assert not r.stats.hits and r.jaxpr is r.before
    return [n for n in r.stats.notes if n.startswith(NEXT)]


def test_refusals_say_which_condition_failed():
    f, v, x = _flax(pad="SAME")
    (note,) = _refused(f, v, x)
    assert "pads (SAME)" in note
    f, v, x = _flax(train=True)
    (note,) = _refused(f, v, x)
    assert "training-mode batch statistics" in note

    def shared(*a):  # the batch norm's output is also returned
        h = _bn(jax.nn.gelu(a[0] @ a[1]), *a[3:])
        return h @ a[2], h
    (note,) = _refused(shared, *_mlp_args())
    assert "another reader" in note
    # Weights larger than the activation: one row against a 6x64 matrix.
    args = list(_mlp_args())
    args[0], args[2] = arr(1, 8), arr(C, 64)
    (note,) = _refused(_mlp, *args)
    assert "larger than the activation" in note


def test_left_to_others_without_a_note():
    # conv/dense → BN → dense with no activation between: the preceding layer takes it.
    def no_act(x, w1, w2, *bn):
        return _bn(x @ w1, *bn) @ w2
    r = testing.check_pass("fuse_batchnorm", no_act, *_mlp_args())
    assert r.stats.hits == {"fuse.batchnorm_fold": 1}
    # A layer norm's scale and shift stay with it (its source is a row normalization).
    p = {"scale": arr(C), "bias": arr(C)}
    notes = _refused(lambda x, w, p: gpt.layernorm(p, jnp.tanh(x)) @ w, arr(B, C), arr(C, F), p)
    assert notes == []
