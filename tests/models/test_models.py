"""Tests of the reference model zoo (graphopt.models) at tiny sizes on CPU.

XLA compilation dominates the run time on a small CPU, so the jitted functions
and the tiny params/batches are cached and shared between tests, and anything
that only needs shapes or graph structure uses eval_shape / make_jaxpr.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend.core import jaxprs_in_params

from graphopt.models import ZOO, cnn, gpt, mlp, rnn

KEY = jax.random.PRNGKey(0)
NAMES = sorted(ZOO)
NOTHING = jax.checkpoint_policies.nothing_saveable
DOTS = jax.checkpoint_policies.dots_saveable
# Tiny deep-MLP sizes: the module defaults (SIZES_DEEP) suit quick manual runs, not unit tests.
DEEP = {"depth": 3, "width": 8, "batch": 2, "T": 4}

EXPECTED_OUT_SHAPE = {
    "mlp": lambda s: (s["batch"], s["sizes"][-1]),
    "gpt": lambda s: (s["batch"], s["seq_len"], s["vocab"]),
    "cnn": lambda s: (s["batch"], s["classes"]),
    "rnn": lambda s: (s["batch"], s["T"], s["out_dim"]),
}


# ----------------------------------------------------------------------------- shared helpers


# Compilation, not execution, dominates at these sizes (threefry kernels alone take seconds to
# optimise on CPU), so skip LLVM's optimisation passes; the HLO, hence the numerics, is unchanged.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _setup(name):
    """(params, batch) of ZOO[name] at its tiny SIZES, from fixed keys."""
    mod = ZOO[name]

    def make(key):
        k_params, k_batch = jax.random.split(key)
        return mod.init(k_params, **mod.SIZES), mod.example_batch(k_batch, **mod.SIZES)

    return _jit(make)(KEY)


@functools.lru_cache(maxsize=None)
def _setup_deep():
    """(params, batch) of the deep residual MLP at the DEEP sizes."""

    def make(key):
        k_params, k_batch = jax.random.split(key)
        return mlp.init_deep(k_params, **DEEP), mlp.example_batch_deep(k_batch, **DEEP)

    return _jit(make)(KEY)


@functools.lru_cache(maxsize=None)
def _value_and_grad(loss_fn, **loss_kwargs):
    """Jitted value_and_grad of loss_fn with keyword options bound (one compile per option set)."""
    return _jit(jax.value_and_grad(functools.partial(loss_fn, **loss_kwargs)))


# Same function -> same jitted wrapper -> compiled once for all the tests.
_cached_jit = functools.lru_cache(maxsize=None)(_jit)


def _train(step, params, batch, opt_state, n_steps=20):
    step = _cached_jit(step)
    losses = []
    for _ in range(n_steps):
        params, opt_state, value = step(params, opt_state, batch)
        losses.append(float(value))
    return params, losses


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _eqns(fn, *args):
    """All equations of fn's jaxpr, nested jaxprs (scan/remat bodies) included."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            found.append(eqn)
            for sub in jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _name_stacks(fn, *args):
    return {str(eqn.source_info.name_stack) for eqn in _eqns(fn, *args)}


# ----------------------------------------------------------------------------- shared interface


@pytest.mark.parametrize("name", NAMES)
def test_interface(name):
    mod = ZOO[name]
    for attr in ("init", "apply", "loss", "example_batch", "optimizer", "init_opt_state",
                 "make_train_step", "train_step"):
        assert callable(getattr(mod, attr)), attr
    assert mod.__doc__
    assert set(mod.SIZES) == set(mod.BENCH_SIZES)
    assert isinstance(mod.optimizer(), optax.GradientTransformation)
    assert isinstance(mod.optimizer(learning_rate=1e-2), optax.GradientTransformation)
    # The keyword defaults of init / example_batch are the tiny SIZES.
    for fn in (mod.init, mod.example_batch):
        for pname, param in inspect.signature(fn).parameters.items():
            if pname in mod.SIZES and param.default is not None:
                assert param.default == mod.SIZES[pname], (fn.__name__, pname)


@pytest.mark.parametrize("name", NAMES)
def test_apply_shape_loss_and_grad(name):
    mod = ZOO[name]
    params, batch = _setup(name)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    out = jax.eval_shape(mod.apply, params, batch[0])
    assert out.shape == EXPECTED_OUT_SHAPE[name](mod.SIZES)

    value, grads = _value_and_grad(mod.loss)(params, batch)
    assert value.shape == () and value.dtype == jnp.float32
    assert np.isfinite(float(value))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    grads = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(g).all() for g in grads)
    assert any(g.any() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_decreases_loss(name):
    mod = ZOO[name]
    params, batch = _setup(name)
    _, losses = _train(mod.train_step, params, batch, _cached_jit(mod.init_opt_state)(params))
    # The reported loss is the one before the update.
    np.testing.assert_allclose(losses[0], float(_value_and_grad(mod.loss)(params, batch)[0]), rtol=1e-5)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_bench_sizes_are_consistent(name):
    """init / example_batch / loss agree on BENCH_SIZES (shapes only: nothing is computed)."""
    mod = ZOO[name]
    params = jax.eval_shape(functools.partial(mod.init, **mod.BENCH_SIZES), KEY)
    batch = jax.eval_shape(functools.partial(mod.example_batch, **mod.BENCH_SIZES), KEY)
    out = jax.eval_shape(mod.loss, params, batch)
    assert out.shape == () and out.dtype == jnp.float32


def test_make_train_step_takes_any_optimizer():
    params, batch = _setup("mlp")
    opt = optax.sgd(0.1)
    _, losses = _train(mlp.make_train_step(opt), params, batch, opt.init(params), n_steps=5)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- deep residual MLP


def test_deep_mlp_shapes_scopes_and_training():
    params, batch = _setup_deep()
    assert len(params["blocks"]) == DEEP["depth"]
    assert params["blocks"][0]["w1"].shape == (DEEP["width"], 4 * DEEP["width"])
    assert jax.eval_shape(mlp.apply_deep, params, batch[0]).shape == (DEEP["batch"], DEEP["T"], DEEP["width"])
    assert {f"block{i}" for i in range(DEEP["depth"])} <= _name_stacks(mlp.apply_deep, params, batch[0])

    _, losses = _train(mlp.train_step_deep, params, batch, _cached_jit(mlp.init_opt_state)(params))
    assert losses[-1] < losses[0], losses


def test_deep_mlp_bench_sizes():
    assert set(mlp.SIZES_DEEP) == set(mlp.BENCH_SIZES_DEEP) == set(DEEP)
    params = jax.eval_shape(functools.partial(mlp.init_deep, **mlp.BENCH_SIZES_DEEP), KEY)
    batch = jax.eval_shape(functools.partial(mlp.example_batch_deep, **mlp.BENCH_SIZES_DEEP), KEY)
    assert jax.eval_shape(mlp.loss_deep, params, batch).shape == ()


@pytest.mark.parametrize("policy", [NOTHING, DOTS], ids=["nothing_saveable", "dots_saveable"])
def test_deep_mlp_block_remat_matches(policy):
    params, batch = _setup_deep()
    ref = _value_and_grad(mlp.loss_deep)(params, batch)
    _assert_trees_close(ref, _value_and_grad(mlp.loss_deep, block_remat=policy)(params, batch))
    # The remat is really in the graph: one checkpoint (remat) equation per block, each in its scope.
    remat_loss = functools.partial(mlp.loss_deep, block_remat=policy)
    remats = [e for e in jax.make_jaxpr(remat_loss)(params, batch).eqns if "remat" in e.primitive.name]
    assert [str(e.source_info.name_stack) for e in remats] == [f"block{i}" for i in range(DEEP["depth"])]
    # The train step forwards the policy.
    step = mlp.make_train_step_deep(mlp.optimizer(), block_remat=policy)
    opt_state = jax.eval_shape(mlp.init_opt_state, params)
    assert any("remat" in e.primitive.name for e in _eqns(step, params, opt_state, batch))


# ----------------------------------------------------------------------------- GPT


def test_gpt_param_layout():
    s = gpt.SIZES
    params, _ = _setup("gpt")
    d, h = s["d_model"], s["n_heads"]
    assert len(params["blocks"]) == s["n_layers"]
    assert params["blocks"][0]["attn"]["wq"].shape == (d, h, d // h)
    assert params["blocks"][0]["attn"]["wo"].shape == (h, d // h, d)
    assert params["w_out"].shape == (d, s["vocab"])
    assert params["wpe"].shape == (s["seq_len"], d)


def _np_unstack(params):
    """gpt.unstack_blocks in NumPy (eager JAX slicing would compile one tiny executable per shape)."""
    return gpt.unstack_blocks(jax.tree.map(np.asarray, params))


@functools.lru_cache(maxsize=None)
def _gpt_stacked():
    """The tiny GPT params with stacked blocks (what init(..., scan_layers=True) returns) and the batch."""
    params, batch = _setup("gpt")
    return _jit(gpt.stack_blocks)(params), batch


def test_gpt_scan_matches_unrolled():
    params, batch = _setup("gpt")
    stacked, _ = _gpt_stacked()
    assert stacked["blocks"]["attn"]["wq"].shape[0] == gpt.SIZES["n_layers"]
    # init(scan_layers=True) yields this layout, and unstack_blocks inverts stack_blocks.
    init_scan = jax.eval_shape(functools.partial(gpt.init, **gpt.SIZES, scan_layers=True), KEY)
    assert jax.tree.map(jnp.shape, init_scan) == jax.tree.map(jnp.shape, stacked)
    _assert_trees_close(_np_unstack(stacked), params, rtol=0, atol=0)

    scanned = _value_and_grad(gpt.loss, scan_layers=True)(stacked, batch)
    unrolled = _value_and_grad(gpt.loss)(params, batch)
    _assert_trees_close((scanned[0], _np_unstack(scanned[1])), unrolled)
    # Unrolled also accepts stacked params (it slices out each layer).
    assert jax.eval_shape(gpt.loss, stacked, batch).shape == ()


def test_gpt_scan_requires_stacked_params():
    params, batch = _setup("gpt")
    with pytest.raises(ValueError, match="stacked"):
        jax.eval_shape(functools.partial(gpt.loss, scan_layers=True), params, batch)


def test_gpt_block_remat_matches():
    # Numerics under scan, the subtler wiring (prevent_cse=False inside the loop body); the unrolled
    # wiring is the deep MLP's, checked numerically there, and structurally below.
    stacked, batch = _gpt_stacked()
    ref = _value_and_grad(gpt.loss, scan_layers=True)(stacked, batch)
    _assert_trees_close(ref, _value_and_grad(gpt.loss, scan_layers=True, block_remat=NOTHING)(stacked, batch))


def test_gpt_block_remat_structure():
    params, batch = _setup("gpt")
    remat_loss = functools.partial(gpt.loss, block_remat=DOTS)
    remats = [e for e in jax.make_jaxpr(remat_loss)(params, batch).eqns if "remat" in e.primitive.name]
    scopes = [str(e.source_info.name_stack) for e in remats]
    assert scopes == [f"block{i}" for i in range(len(params["blocks"]))]
    assert all(e.params["policy"] is DOTS for e in remats)
    assert jax.eval_shape(jax.value_and_grad(remat_loss), params, batch)[0].shape == ()
    # Under scan: a single remat inside the loop body.
    stacked, _ = _gpt_stacked()
    scan_loss = functools.partial(gpt.loss, scan_layers=True, block_remat=DOTS)
    (scan_eqn,) = [e for e in jax.make_jaxpr(scan_loss)(stacked, batch).eqns if e.primitive.name == "scan"]
    assert [e.primitive.name for e in scan_eqn.params["jaxpr"].eqns if "remat" in e.primitive.name]


def test_gpt_make_train_step_forwards_options():
    params, batch = _gpt_stacked()
    step = gpt.make_train_step(gpt.optimizer(), scan_layers=True, block_remat=NOTHING,
                               dtype=jnp.bfloat16)
    opt_state = jax.eval_shape(gpt.init_opt_state, params)
    eqns = _eqns(step, params, opt_state, batch)
    prims = {e.primitive.name for e in eqns}
    assert "scan" in prims and any("remat" in p for p in prims)
    assert any(e.primitive.name == "dot_general" and e.outvars[0].aval.dtype == jnp.bfloat16 for e in eqns)
    out = jax.eval_shape(step, params, opt_state, batch)
    assert jax.tree.structure(out[0]) == jax.tree.structure(params)


def test_gpt_bf16():
    params, batch = _setup("gpt")
    bf16_loss = functools.partial(gpt.loss, dtype=jnp.bfloat16)
    logits = jax.eval_shape(functools.partial(gpt.apply, dtype=jnp.bfloat16), params, batch[0])
    assert logits.dtype == jnp.bfloat16
    value = _jit(bf16_loss)(params, batch)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    np.testing.assert_allclose(float(value), float(_value_and_grad(gpt.loss)(params, batch)[0]), rtol=2e-2)
    # Gradients come back in the params' float32.
    grads = jax.eval_shape(jax.grad(bf16_loss), params, batch)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    # Every matmul really runs in bf16.
    dots = [e for e in _eqns(bf16_loss, params, batch) if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_gpt_tied_embeddings():
    tied_params = jax.eval_shape(functools.partial(gpt.init, **gpt.SIZES, tied=True), KEY)
    assert "w_out" not in tied_params
    # Same layout as the untied params minus w_out, so reuse those values.
    params, batch = _setup("gpt")
    params = {name: value for name, value in params.items() if name != "w_out"}
    assert jax.tree.structure(params) == jax.tree.structure(tied_params)
    assert jax.eval_shape(gpt.apply, params, batch[0]).shape == EXPECTED_OUT_SHAPE["gpt"](gpt.SIZES)
    assert jax.eval_shape(gpt.loss, params, batch).shape == ()


def test_gpt_name_scopes():
    params, batch = _setup("gpt")
    names = _name_stacks(gpt.loss, params, batch)
    for i in range(gpt.SIZES["n_layers"]):
        assert f"block{i}" in names
        assert f"block{i}/attention" in names
    stacked, _ = _gpt_stacked()
    assert "block/attention" in _name_stacks(functools.partial(gpt.loss, scan_layers=True), stacked, batch)


def test_attention_reference():
    b, t, h, dh = 2, 5, 3, 4
    q, k, v = np.random.default_rng(0).standard_normal((3, b, t, h, dh)).astype(np.float32)
    attn = _jit(gpt.attention, static_argnames="causal")
    out = np.asarray(attn(q, k, v, causal=True))
    assert out.shape == (b, t, h, dh)
    # Naive NumPy reference, one query position at a time.
    ref = np.empty_like(out)
    for i in range(t):
        s = np.einsum("bhd,bshd->bhs", q[:, i], k[:, : i + 1]) / np.sqrt(dh)
        p = np.exp(s - s.max(-1, keepdims=True))
        ref[:, i] = np.einsum("bhs,bshd->bhd", p / p.sum(-1, keepdims=True), v[:, : i + 1])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # Causality: changing the last key/value leaves earlier positions unchanged.
    last = (np.arange(t) == t - 1)[:, None, None].astype(np.float32)  # bumps position t-1 only
    out2 = np.asarray(attn(q, k + last, v + last))
    np.testing.assert_allclose(out[:, :-1], out2[:, :-1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[:, -1], out2[:, -1])
    # Non-causal: the first query sees every key.
    assert not np.allclose(np.asarray(attn(q, k, v, causal=False))[:, 0], out[:, 0])


# ----------------------------------------------------------------------------- CNN


def test_cnn_train_and_inference_batch_norm():
    params, (x, _) = _setup("cnn")
    apply = _jit(cnn.apply, static_argnames="train")
    train_out = apply(params, x, train=True)
    infer_out = apply(params, x, train=False)
    assert not np.allclose(train_out, infer_out)

    # With running stats set to this batch's statistics, inference reproduces train mode.
    update = _jit(cnn.update_batch_stats)
    synced = update(params, x, 0.0)
    assert not np.allclose(synced["bn0"]["mean"], 0.0)
    np.testing.assert_allclose(apply(synced, x, train=False), train_out, rtol=1e-4, atol=1e-5)

    # Inference reads the running stats; train mode ignores them.
    shifted = {**params, "bn1": {**params["bn1"], "mean": np.asarray(params["bn1"]["mean"]) + 0.5}}
    assert not np.allclose(apply(shifted, x, train=False), infer_out)
    np.testing.assert_allclose(apply(shifted, x, train=True), train_out, rtol=1e-6)

    # The EMA moves the stats part of the way.
    half, synced_bn0 = update(params, x, 0.5), jax.tree.map(np.asarray, synced["bn0"])
    np.testing.assert_allclose(half["bn0"]["mean"], 0.5 * synced_bn0["mean"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(half["bn0"]["var"], 0.5 + 0.5 * synced_bn0["var"], rtol=1e-5)


def test_cnn_running_stats_untouched_by_training():
    params, batch = _setup("cnn")
    _, grads = _value_and_grad(cnn.loss)(params, batch)
    for i in range(len(cnn.SIZES["channels"])):
        assert not np.any(grads[f"bn{i}"]["mean"]) and not np.any(grads[f"bn{i}"]["var"])
    new, _ = _train(cnn.train_step, params, batch, _cached_jit(cnn.init_opt_state)(params), n_steps=3)
    for i in range(len(cnn.SIZES["channels"])):
        for stat in ("mean", "var"):
            np.testing.assert_array_equal(new[f"bn{i}"][stat], params[f"bn{i}"][stat])


def test_cnn_inference_graph_is_conv_then_bn():
    params, (x, _) = _setup("cnn")
    prims = [e.primitive.name for e in jax.make_jaxpr(cnn.apply)(params, x).eqns]
    assert prims.count("conv_general_dilated") == len(cnn.SIZES["channels"])
    # Inference BN is pure elementwise math on the running stats: no reductions before the pool.
    first_reduce = prims.index("reduce_sum")
    assert "rsqrt" in prims[:first_reduce]
    assert prims[:first_reduce].count("conv_general_dilated") == len(cnn.SIZES["channels"])


# ----------------------------------------------------------------------------- RNN


def test_rnn_matches_python_loop():
    params, (x, _) = _setup("rnn")
    apply = _jit(rnn.apply)
    out = np.asarray(apply(params, x))
    p, x = jax.tree.map(np.asarray, (params, x))
    h = np.zeros((x.shape[0], rnn.SIZES["hidden"]), np.float32)
    ys = []
    for t in range(x.shape[1]):
        h = np.tanh(x[:, t] @ p["w_x"] + h @ p["w_h"] + p["b"])
        ys.append(h @ p["w_y"] + p["b_y"])
    np.testing.assert_allclose(out, np.stack(ys, axis=1), rtol=1e-5, atol=1e-5)
    assert "scan" in [e.primitive.name for e in jax.make_jaxpr(rnn.apply)(params, x).eqns]
    h0 = np.ones((x.shape[0], rnn.SIZES["hidden"]), np.float32)
    assert not np.allclose(apply(params, x, h0), out)
