"""Structural pruning: groups from the jaxpr, exact dead-channel removal, sparsity, heads."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from graphopt.models import cnn, gpt, mlp
from graphopt.transforms import structural_groups as sg
from graphopt.transforms.structural import PruningError, prune_channels


def _zero_removed_consumers(plan, params):
    """The unpruned params with every removed channel's consuming weights zeroed.

    The pruned model must compute exactly this function (it is how removal is defined)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [np.array(x) for x in leaves]
    for g in plan.groups:
        for m in g.members:
            if m.consumer:
                idx = sg.axis_index(plan.analysis, m.leaf, m.axis, {g.atom: plan.kept[g.atom]})
                keep = np.zeros(leaves[m.leaf].shape[m.axis], bool)
                keep[idx] = True
                shape = [1] * leaves[m.leaf].ndim
                shape[m.axis] = -1
                leaves[m.leaf] = leaves[m.leaf] * keep.reshape(shape)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_mlp_groups_follow_hidden_units_into_bias_and_next_weight():
    params = mlp.init(jax.random.key(0), sizes=(5, 6, 7, 3))
    plan = prune_channels(mlp.apply, params, jnp.ones((4, 5)), sparsity=0.5)
    members = [{(m.path, m.axis, m.consumer) for m in g.members} for g in plan.groups]
    assert members == [{("layers/0/b", 0, False), ("layers/0/w", 1, False), ("layers/1/w", 0, True)},
                       {("layers/1/b", 0, False), ("layers/1/w", 1, False), ("layers/2/w", 0, True)}]
    assert _shapes(plan.apply(params)) == {"layers": [{"b": (3,), "w": (5, 3)}, {"b": (4,), "w": (3, 4)},
                                                      {"b": (3,), "w": (4, 3)}]}
    p0, p1 = plan.param_counts()
    assert p1 < p0 and plan.flops[1] < plan.flops[0]
    text = str(plan)
    assert "layers/0/w:1" in text and "6 -> 3" in text and "FLOPs" in text


def test_exact_dead_channels_removed_outputs_and_grads_unchanged():
    params = mlp.init(jax.random.key(1), sizes=(5, 8, 6, 3))
    w0, w1 = params["layers"][0]["w"], params["layers"][1]["w"]
    params["layers"][0]["w"] = w0.at[:, [1, 4]].set(0.0)   # dead by zero incoming (bias is 0)
    params["layers"][1]["w"] = w1.at[6, :].set(0.0)        # dead by zero outgoing
    params["layers"][1]["b"] = params["layers"][1]["b"].at[2].set(0.5)
    params["layers"][2]["w"] = params["layers"][2]["w"].at[2, :].set(0.0)  # constant 0.5 unit, unread
    x = jax.random.normal(jax.random.key(2), (16, 5))
    plan = prune_channels(mlp.apply, params, x, sparsity=0.0)
    assert [sorted(set(range(g.size)) - set(plan.kept[g.atom].tolist())) for g in plan.groups] == [[1, 4, 6], [2]]
    small = plan.apply(params)
    np.testing.assert_allclose(plan.function(small, x), mlp.apply(params, x), rtol=1e-6, atol=1e-6)
    gx = jax.grad(lambda x: mlp.apply(params, x).sum())(x)
    gx_small = jax.grad(lambda x: plan.function(small, x).sum())(x)
    np.testing.assert_allclose(gx_small, gx, rtol=1e-6, atol=1e-6)


def test_zero_incoming_but_nonzero_constant_is_not_dead():
    params = mlp.init(jax.random.key(1), sizes=(5, 8, 3))
    params["layers"][0]["w"] = params["layers"][0]["w"].at[:, 3].set(0.0)
    params["layers"][0]["b"] = params["layers"][0]["b"].at[3].set(1.0)  # relu(1) = 1 reaches the output
    plan = prune_channels(mlp.apply, params, jnp.ones((2, 5)), sparsity=0.0)
    assert [len(plan.kept[g.atom]) for g in plan.groups] == [8]


def test_exact_dead_cnn_channels_with_batchnorm():
    params = cnn.init(jax.random.key(0), channels=(4, 8))
    params["conv1"]["w"] = params["conv1"]["w"].at[:, :, 2, :].set(0.0)  # conv0 channel 2 unread
    params["head"]["w"] = params["head"]["w"].at[5, :].set(0.0)          # conv1 channel 5 unread
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    plan = prune_channels(cnn.apply, params, x, sparsity=0.0)
    assert [len(plan.kept[g.atom]) for g in plan.groups] == [3, 7]
    small = plan.apply(params)
    assert small["bn0"]["mean"].shape == (3,) and small["conv1"]["w"].shape == (3, 3, 3, 7)
    np.testing.assert_allclose(jax.jit(plan.function)(small, x), jax.jit(cnn.apply)(params, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor"])
def test_sparsity_matches_zeroed_consumers(criterion):
    params = cnn.init(jax.random.key(0), channels=(4, 8))
    x, y = cnn.example_batch(jax.random.key(1), batch=4)
    plan = prune_channels(cnn.apply, params, x, sparsity=0.5, criterion=criterion,
                          loss_fn=cnn.loss, batches=[(x, y)])
    assert [len(plan.kept[g.atom]) for g in plan.groups] == [2, 4]
    np.testing.assert_allclose(jax.jit(plan.function)(plan.apply(params), x),
                               jax.jit(cnn.apply)(_zero_removed_consumers(plan, params), x), rtol=1e-5, atol=1e-5)


def test_criteria_rank_by_magnitude_and_taylor():
    params = mlp.init(jax.random.key(0), sizes=(4, 6, 2))
    params["layers"][0]["w"] = params["layers"][0]["w"].at[:, 0].multiply(1e-3)
    params["layers"][1]["w"] = params["layers"][1]["w"].at[0, :].multiply(1e-3)
    plan = prune_channels(mlp.apply, params, jnp.ones((2, 4)), sparsity=0.2, criterion="l1")
    assert 0 not in plan.kept[plan.groups[0].atom]
    x, labels = mlp.example_batch(jax.random.key(1), sizes=(4, 6, 2), batch=32)
    taylor = prune_channels(mlp.apply, params, x, sparsity=0.2, criterion="taylor",
                            loss_fn=mlp.loss, batches=[(x, labels)])
    assert len(taylor.kept[taylor.groups[0].atom]) == 5


def test_global_scope_prunes_total_fraction_keeps_one_per_group():
    params = mlp.init(jax.random.key(0), sizes=(4, 16, 4, 2))
    params["layers"][0]["w"] = params["layers"][0]["w"] * 100.0  # layer 0 looks important only unnormalised
    plan = prune_channels(mlp.apply, params, jnp.ones((2, 4)), sparsity=0.6, scope="global")
    kept = [len(plan.kept[g.atom]) for g in plan.groups]
    assert sum(kept) == 20 - 12 and min(kept) >= 1


def test_optax_state_sliced_like_params():
    params = mlp.init(jax.random.key(0), sizes=(5, 6, 3))
    opt = optax.adam(1e-2)
    state = opt.init(params)
    x, labels = mlp.example_batch(jax.random.key(1), sizes=(5, 6, 3))
    _, state, _ = mlp.make_train_step(opt)(params, state, (x, labels))
    plan = prune_channels(mlp.apply, params, x, sparsity=0.5)
    small_state = plan.apply(state)
    assert _shapes(small_state[0].mu) == _shapes(plan.apply(params))
    np.testing.assert_array_equal(small_state[0].nu["layers"][1]["w"],
                                  state[0].nu["layers"][1]["w"][plan.kept[plan.groups[0].atom]])
    assert int(small_state[0].count) == 1
    small = plan.apply(params)
    updates, _ = opt.update(jax.grad(mlp.loss)(small, (x, labels)), small_state, small)
    assert _shapes(updates) == _shapes(small)
    with pytest.raises(PruningError, match="layers/0/w|not inside a copy"):
        plan.apply({"stray": jnp.zeros((5, 6))})


def test_transformer_heads_pruned_with_qkvo_consistent():
    params = gpt.init(jax.random.key(0), n_layers=1, d_model=32, n_heads=4)
    tokens, _ = gpt.example_batch(jax.random.key(1), batch=2)
    plan = prune_channels(gpt.apply, params, tokens, sparsity=0.5, include=["blocks/0/attn/wq"])
    (heads,) = plan.groups
    assert {(m.path, m.axis) for m in heads.members} == {
        ("blocks/0/attn/wq", 1), ("blocks/0/attn/wk", 1), ("blocks/0/attn/wv", 1), ("blocks/0/attn/wo", 0)}
    small = plan.apply(params)
    attn = small["blocks"][0]["attn"]
    assert attn["wq"].shape == attn["wk"].shape == attn["wv"].shape == (32, 2, 8)
    assert attn["wo"].shape == (2, 8, 32)
    # dropping heads == zeroing their rows of wo in the full model
    np.testing.assert_allclose(jax.jit(plan.function)(small, tokens),
                               jax.jit(gpt.apply)(_zero_removed_consumers(plan, params), tokens), rtol=1e-5, atol=1e-5)
    assert "contracted between two activations" in str(plan)  # q.k head dim: refused, with reason


def _fused_qk_block(p, x):
    b, t, d = x.shape
    _, h, dv = p["wv"].shape                       # heads and value size from the param shapes
    q, k = jnp.split(x @ p["wqk"], 2, axis=-1)     # fused q/k projection, split in two
    dqk = q.shape[-1] // h
    q, k = q.reshape(b, t, h, dqk), k.reshape(b, t, h, dqk)
    v = jnp.einsum("btd,dhe->bthe", x, p["wv"])
    a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(dqk), -1)
    return x + jnp.einsum("bhts,bshe->bthe", a, v).reshape(b, t, h * dv) @ p["wo"].reshape(h * dv, d)


def test_heads_followed_through_fused_qk_split_and_reshape():
    d, h = 16, 4
    k = jax.random.split(jax.random.key(0), 4)
    params = {"wqk": jax.random.normal(k[0], (d, 2 * d)) / 4, "wv": jax.random.normal(k[1], (d, h, 4)) / 4,
              "wo": jax.random.normal(k[2], (h, 4, d)) / 4}
    x = jax.random.normal(k[3], (2, 5, d))
    plan = prune_channels(_fused_qk_block, params, x, sparsity=0.5)
    by_size = {g.size: {(m.path, m.axis) for m in g.members} for g in plan.groups}
    assert by_size == {4: {("wqk", 1), ("wv", 1), ("wo", 0)}, 8: {("wo", 1), ("wv", 2)}} or \
        sorted(g.size for g in plan.groups) == [4, 4]
    heads = next(g for g in plan.groups if ("wqk", 1) in {(m.path, m.axis) for m in g.members})
    small = plan.apply(params)
    kept = plan.kept[heads.atom]
    assert small["wqk"].shape == (d, 2 * 4 * len(kept))
    # the q piece and the k piece keep the same heads: columns [h*4 : h*4+4] of each half
    cols = np.concatenate([np.arange(hh * 4, hh * 4 + 4) for hh in kept])
    np.testing.assert_array_equal(small["wqk"], params["wqk"][:, np.concatenate([cols, d + cols])])
    np.testing.assert_allclose(plan.function(small, x),
                               _fused_qk_block(_zero_removed_consumers(plan, params), x), rtol=1e-5, atol=1e-5)


def test_channels_followed_through_concatenate():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k[0], (3, 6)), "w2": jax.random.normal(k[1], (3, 4)),
              "w3": jax.random.normal(k[2], (10, 2))}

    def two_branch(p, x):
        return jnp.concatenate([jax.nn.relu(x @ p["w1"]), jnp.tanh(x @ p["w2"])], axis=-1) @ p["w3"]

    x = jax.random.normal(k[3], (5, 3))
    plan = prune_channels(two_branch, params, x, sparsity=0.5)
    assert sorted((g.size, len(plan.kept[g.atom])) for g in plan.groups) == [(4, 2), (6, 3)]
    small = plan.apply(params)
    assert small["w3"].shape == (5, 2) and small["w1"].shape == (3, 3) and small["w2"].shape == (3, 2)
    np.testing.assert_allclose(plan.function(small, x),
                               two_branch(_zero_removed_consumers(plan, params), x), rtol=1e-5, atol=1e-5)


def _unfollowable(p, x):
    h = jax.nn.relu(x @ p["w1"])
    return jnp.cumsum(h, axis=-1) @ p["w2"]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half", True, float("nan")])
def test_bad_sparsity_names_the_argument(bad):
    params = mlp.init(jax.random.key(0), sizes=(3, 4, 2))
    with pytest.raises(PruningError, match="sparsity"):
        prune_channels(mlp.apply, params, jnp.ones((1, 3)), sparsity=bad)


def test_bad_arguments_and_unfollowable_dimension():
    params = mlp.init(jax.random.key(0), sizes=(3, 4, 2))
    x = jnp.ones((1, 3))
    with pytest.raises(PruningError, match="criterion"):
        prune_channels(mlp.apply, params, x, criterion="l3")
    with pytest.raises(PruningError, match="loss_fn"):
        prune_channels(mlp.apply, params, x, criterion="taylor")
    with pytest.raises(PruningError, match="scope"):
        prune_channels(mlp.apply, params, x, scope="model")
    with pytest.raises(PruningError, match="'layers/9/w'.*not a weight"):
        prune_channels(mlp.apply, params, x, include=["layers/9/w"])
    p = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
    with pytest.raises(PruningError, match=r"w1.*axis 1: cumsum has no structural-pruning rule"):
        prune_channels(_unfollowable, p, x, include=["w1"])
    with pytest.raises(PruningError, match="no prunable channel group.*cumsum"):
        prune_channels(_unfollowable, p, x)
    gp = gpt.init(jax.random.key(0), n_layers=1)
    with pytest.raises(PruningError, match="wte.*gather"):
        prune_channels(gpt.apply, gp, jnp.zeros((1, 16), jnp.int32), include=["wte"])


def test_function_rejects_unpruned_params():
    params = mlp.init(jax.random.key(0), sizes=(3, 4, 2))
    plan = prune_channels(mlp.apply, params, jnp.ones((1, 3)), sparsity=0.5)
    with pytest.raises(PruningError, match="plan.apply"):
        plan.function(params, jnp.ones((1, 3)))


@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.integers(2, 9), min_size=2, max_size=4), sparsity=st.floats(0.0, 0.95),
       criterion=st.sampled_from(["l1", "l2"]), scope=st.sampled_from(["layer", "global"]))
def test_property_pruned_mlp_equals_full_with_removed_units_unread(sizes, sparsity, criterion, scope):
    sizes = [3, *sizes, 2]
    params = mlp.init(jax.random.key(len(sizes)), sizes=tuple(sizes))
    x = jax.random.normal(jax.random.key(7), (4, 3))
    plan = prune_channels(mlp.apply, params, x, sparsity=sparsity, criterion=criterion, scope=scope)
    assert [g.size for g in plan.groups] == sizes[1:-1]
    assert all(1 <= len(plan.kept[g.atom]) <= g.size for g in plan.groups)
    np.testing.assert_allclose(jax.jit(plan.function)(plan.apply(params), x),
                               jax.jit(mlp.apply)(_zero_removed_consumers(plan, params), x), rtol=1e-5, atol=1e-5)


def test_flax_and_equinox_param_pytrees():
    flax_nn = pytest.importorskip("flax.linen")
    eqx = pytest.importorskip("equinox")
    x = jax.random.normal(jax.random.key(0), (4, 5))

    class Net(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            return flax_nn.Dense(3)(flax_nn.relu(flax_nn.Dense(8)(x)))

    net = Net()
    variables = net.init(jax.random.key(1), x)
    plan = prune_channels(net.apply, variables, x, sparsity=0.5)
    small = plan.apply(variables)
    assert small["params"]["Dense_1"]["kernel"].shape == (5, 4)   # Dense(8), built second
    assert small["params"]["Dense_0"]["kernel"].shape == (4, 3)
    assert "replays the traced jaxpr" in str(plan)                   # linen checks kernel shapes
    jax.grad(lambda p: plan.function(p, x).sum())(small)             # the replay is differentiable
    np.testing.assert_allclose(plan.function(small, x), net.apply(_zero_removed_consumers(plan, variables), x),
                               rtol=1e-5, atol=1e-5)

    model = eqx.nn.MLP(5, 3, width_size=8, depth=1, key=jax.random.key(2))
    arrays, static = eqx.partition(model, eqx.is_array)

    def eqx_apply(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    plan = prune_channels(eqx_apply, arrays, x, sparsity=0.5)
    small = plan.apply(arrays)
    assert small.layers[0].weight.shape == (4, 5) and small.layers[1].weight.shape == (3, 4)
    np.testing.assert_allclose(plan.function(small, x), eqx_apply(_zero_removed_consumers(plan, arrays), x),
                               rtol=1e-5, atol=1e-5)


def test_replay_when_apply_checks_its_shapes():
    params = mlp.init(jax.random.key(0), sizes=(3, 8, 6, 2))

    def strict(p, x):
        if p["layers"][0]["w"].shape != (3, 8):   # a model that checks its config (like flax linen)
            raise ValueError("wrong kernel shape")
        return mlp.apply(p, x)

    x = jax.random.normal(jax.random.key(1), (4, 3))
    plan = prune_channels(strict, params, x, sparsity=0.5)
    assert "replays the traced jaxpr" in str(plan)
    small = plan.apply(params)
    np.testing.assert_allclose(jax.jit(plan.function)(small, x),
                               mlp.apply(_zero_removed_consumers(plan, params), x), rtol=1e-5, atol=1e-5)
    g_replay = jax.grad(lambda p: plan.function(p, x).sum())(small)
    g_direct = jax.grad(lambda p: mlp.apply(p, x).sum())(small)
    for a, b in zip(jax.tree.leaves(g_replay), jax.tree.leaves(g_direct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
