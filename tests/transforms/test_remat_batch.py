"""Micro-batch streaming (transforms/remat/batch.py) and its place in the post-AD remat pass."""
import re
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from graphopt import ir, testing
from graphopt.models import cnn, gpt, mlp, rnn
from graphopt.passes import PassContext
from graphopt.transforms import remat
from graphopt.transforms.remat import batch as remat_batch

K = jax.random.PRNGKey(0)
CNN = dict(batch=8, height=16, width=16, in_channels=3, channels=(8, 16), classes=10)


def _step(name):
    if name == "cnn":
        p = cnn.init(K, **CNN)
        return cnn.train_step, (p, cnn.init_opt_state(p), cnn.example_batch(K, **CNN))
    if name == "mlp":
        s = dict(depth=3, width=32, batch=4, T=16)
        p = mlp.init_deep(K, **s)
        return mlp.train_step_deep, (p, mlp.init_opt_state(p), mlp.example_batch_deep(K, **s))
    if name in ("gpt", "gpt_scan"):
        g = dict(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab=64, batch=4)
        scan = name == "gpt_scan"
        p = gpt.init(K, **g, scan_layers=scan)
        b = gpt.example_batch(K, batch=4, seq_len=16, vocab=64)
        return gpt.make_train_step(gpt.optimizer(), scan_layers=scan), (p, gpt.init_opt_state(p), b)
    r = dict(batch=4, T=8, in_dim=3, hidden=16, out_dim=2)
    p = rnn.init(K, **r)
    return rnn.train_step, (p, rnn.init_opt_state(p), rnn.example_batch(K, **r))


def _outputs(cj, flat):
    return jax.jit(ir.jaxpr_as_fun(cj))(*flat)


def _assert_same(cj, new, flat, tol):
    for x, y in zip(_outputs(cj, flat), _outputs(new, flat)):
        assert testing.max_rel_error(x, y) <= tol


def _loops(cj):
    """The micro-batch loops (with more than 2 micro-batches the first runs before its loop)."""
    return [e for e in cj.jaxpr.eqns if e.primitive.name == "scan"
            and re.fullmatch(r"remat/stream\d+", ir.name_stack(e))]


def _first(e):
    return re.fullmatch(r"remat/stream\d+/first(/.*)?", ir.name_stack(e))


@pytest.mark.slow  # minutes of compiles: the full leg only (CI leg 1)
@pytest.mark.parametrize("name", ["mlp", "gpt", "gpt_scan", "rnn"])
def test_gradient_accumulation_recomputes_nothing(name):
    # no batch norm: the loss and every gradient are sums over the batch reached in one
    # loop, so streaming is gradient accumulation (nothing runs twice)
    step, args = _step(name)
    cj = jax.make_jaxpr(step)(*args)
    an = remat_batch.analyse(cj)
    assert an.n == 4 and an.n_loops == 1 and an.recomputed_flops() == 0
    flat = jax.tree_util.tree_leaves(args)
    for k in (2, 4):
        new = remat_batch.stream(cj, k, an)
        ir.check(new)
        (loop,) = _loops(new)
        assert loop.params["length"] == (k - 1 if k > 2 else k)  # the first one peeled
        _assert_same(cj, new, flat, 2e-5)  # params after Adam, opt state, loss


def test_scan_weight_gradients_become_sums():
    # the RNN's weights are scan consts: their gradients accumulate in the backward scan's
    # carries, which must start from zero per micro-batch and get their init added once
    step, args = _step("rnn")
    an = remat_batch.analyse(jax.make_jaxpr(step)(*args))
    scans = [h for i, h in an.how.items() if an.eqns[i].primitive.name == "scan"]
    assert any(h.base for h in scans) and any("sum" in h.outs for h in scans)


def test_embedding_gradient_is_a_scatter_sum():
    step, args = _step("gpt")
    an = remat_batch.analyse(jax.make_jaxpr(step)(*args))
    scat = [h for i, h in an.how.items() if an.eqns[i].primitive.name.startswith("scatter")]
    assert any(h.outs == ["sum"] and h.base == {0: 0} for h in scat)


@pytest.mark.slow  # minutes of compiles: the full leg only (CI leg 1)
def test_batch_norm_cnn_streams_in_loops_and_shrinks():
    step, args = _step("cnn")
    cj = jax.make_jaxpr(step)(*args)
    an = remat_batch.analyse(cj)
    # BN0 mean, BN0 var, BN1 mean, BN1 var, loss + head/BN1 backward sums, ... conv0 grad
    assert an.n_loops >= 7 and an.recomputed_flops() > 0
    flat = jax.tree_util.tree_leaves(args)
    act = CNN["batch"] * CNN["height"] * CNN["width"]
    for k in (2, 4):
        new = remat_batch.stream(cj, k, an)
        assert len(_loops(new)) == an.n_loops
        # no full-batch activation outside the loops and their first micro-batches (the
        # inputs reshaped to [k, n/k, ...] aside)
        assert all(np.prod(v.aval.shape) < act for e in new.jaxpr.eqns
                   if e.primitive.name not in ("scan", "reshape") and not _first(e)
                   for v in e.outvars)
        _assert_same(cj, new, flat, 1e-4)  # params after Adam's first step amplify rounding
    # gradients themselves, float32 summation order only
    loss_grad = jax.grad(cnn.loss)
    gj = jax.make_jaxpr(loss_grad)(args[0], args[2])
    gflat = jax.tree_util.tree_leaves((args[0], args[2]))
    _assert_same(gj, remat_batch.stream(gj, 4), gflat, 1e-4)
    assert remat.xla_temp(remat_batch.stream(cj, 4, an)) <= 0.5 * remat.xla_temp(cj)


@pytest.mark.slow  # minutes of compiles: the full leg only (CI leg 1)
def test_pass_micro_batches_below_the_keep_floor():
    step, args = _step("cnn")
    cj = jax.make_jaxpr(step)(*args)
    base = remat.xla_temp(cj)
    res = remat.remat_pass(cj, PassContext("post-AD", {"memory_budget": 0.25}))
    assert res.changed and res.stats.hits["remat.micro_batches"] >= 2
    assert any("no choice of what to keep reaches the budget" in n for n in res.stats.notes)
    assert remat.xla_temp(res.jaxpr) <= 0.25 * base * 1.05
    _assert_same(cj, res.jaxpr, jax.tree_util.tree_leaves(args), 1e-4)
    with pytest.raises(remat.BudgetError, match=r"smallest feasible budget is \d+ bytes"):
        remat.remat_pass(cj, PassContext("post-AD", {"memory_budget": 0.25,
                                                     "remat_micro_batches": False}))


def test_pass_prefers_micro_batches_that_recompute_nothing():
    step, args = _step("mlp")
    cj = jax.make_jaxpr(step)(*args)
    base = remat.xla_temp(cj)
    res = remat.remat_pass(cj, PassContext("post-AD", {"memory_budget": 0.5}))
    assert res.changed and res.stats.hits["remat.flops_recomputed"] == 0
    assert any("gradient accumulation" in n for n in res.stats.notes)
    assert remat.xla_temp(res.jaxpr) <= 0.5 * base * 1.05
    again = remat.remat_pass(res.jaxpr, PassContext("post-AD", {"memory_budget": 0.5}))
    assert not again.changed  # a fraction never compounds
    # ... and the report says why (the backward now sits in the loop, not at top level)
    assert any("already rematerialized" in n for n in again.stats.notes)
    jitted = jax.make_jaxpr(jax.jit(ir.jaxpr_as_fun(res.jaxpr)))(
        *jax.tree_util.tree_leaves(args))  # the step under one jit: its body is looked into
    assert any("already rematerialized" in n for n in remat.remat_pass(
        jitted, PassContext("post-AD", {"memory_budget": 0.5})).stats.notes)
    _assert_same(cj, res.jaxpr, jax.tree_util.tree_leaves(args), 2e-5)


def _mixing_step(mix):
    def step(w, x):
        def loss(w):
            h = x
            for _ in range(4):  # layers enough for the pass to choose what to keep
                h = jnp.tanh(h @ w)
            return jnp.mean(mix(h) ** 2)
        g = jax.grad(loss)(w)
        return w - 0.1 * g
    w = jax.random.normal(K, (64, 64)) / 8
    x = jax.random.normal(K, (32, 64))
    return step, (w, x)


@pytest.mark.parametrize("mix, word", [
    (lambda h: jnp.cumsum(h, axis=0), "cumsum"),           # runs along the batch
    (lambda h: h @ h.T, "dot_general"),                    # example x example
    (lambda h: jnp.sort(h, axis=0), "sort"),
])
def test_programs_mixing_examples_are_refused_by_name(mix, word):
    step, args = _mixing_step(mix)
    cj = jax.make_jaxpr(step)(*args)
    with pytest.raises(remat_batch.Unstreamable, match=word):
        remat_batch.analyse(cj)
    # the pass goes on with choosing what to keep; its error says why it did not stream
    with pytest.raises(remat.BudgetError, match=f"micro-batching not possible: {word}"):
        remat.remat_pass(cj, PassContext("post-AD", {"memory_budget": 0.5,
                                                     "remat_measure": "estimate"}))


def test_effects_are_refused():
    def step(w, x):
        def loss(w):
            jax.debug.print("w {}", w[0, 0])
            return jnp.mean(jnp.tanh(x @ w) ** 2)
        return w - 0.1 * jax.grad(loss)(w)
    cj = jax.make_jaxpr(step)(jnp.ones((4, 4)), jnp.ones((8, 4)))
    with pytest.raises(remat_batch.Unstreamable, match="effects"):
        remat_batch.analyse(cj)


def test_option_is_checked():
    step, args = _step("mlp")
    cj = jax.make_jaxpr(step)(*args)
    for bad in ("yes", 1, 2.0):
        with pytest.raises(ValueError, match="remat_micro_batches"):
            remat.remat_pass(cj, PassContext("post-AD", {"memory_budget": 0.5,
                                                         "remat_micro_batches": bad}))
    with pytest.raises(ValueError, match="does not divide the batch of 4"):
        remat.remat_pass(cj, PassContext("post-AD", {"memory_budget": 0.5,
                                                     "remat_micro_batches": 3}))
    res = remat.remat_pass(cj, PassContext("post-AD", {"memory_budget": 0.5,
                                                       "remat_micro_batches": 4}))
    assert res.stats.hits["remat.micro_batches"] == 4


def test_batch_is_the_trailing_arguments_leading_axis():
    n, axes = remat_batch.batch_inputs(jax.make_jaxpr(lambda a, b, x, y: 0)(
        jnp.ones((8, 3)), jnp.ones((3, 8)), jnp.ones((8, 2)), jnp.ones((8,))).jaxpr)
    assert n == 8 and axes == [None, None, 0, 0]  # a leading 8 before a non-batch stops it
    with pytest.raises(remat_batch.Unstreamable, match="no batch axis"):
        remat_batch.batch_inputs(jax.make_jaxpr(lambda a: a)(jnp.float32(1)).jaxpr)


def test_auto_leaves_scanned_steps_to_choosing_what_to_keep():
    # micro-batches would run the RNN's 8 steps K times over: not first under "auto"
    step, args = _step("rnn")
    cj = jax.make_jaxpr(step)(*args)
    assert remat_batch.analyse(cj).batched_scans >= 2  # forward and backward scans
    ctx = {"memory_budget": 0.75}
    res = remat.remat_pass(cj, PassContext("post-AD", ctx))
    assert res.changed and "remat.micro_batches" not in res.stats.hits
    forced = remat.remat_pass(cj, PassContext("post-AD", {**ctx, "remat_micro_batches": True}))
    assert forced.stats.hits["remat.micro_batches"] >= 2


def test_optimize_tells_the_pass_which_leaves_are_the_batch():
    # optimize flattens {name: arg} sorted by name, so "batch" leaves come first, not last
    j = jax.make_jaxpr(lambda b0, b1, w, v: 0)(
        jnp.ones((8, 3)), jnp.ones((8,)), jnp.ones((8, 8)), jnp.ones((3,))).jaxpr
    n, axes = remat_batch.batch_inputs(j, positions=[2, 2, 0, 1])
    assert n == 8 and axes == [0, 0, None, None]
    with pytest.raises(remat_batch.Unstreamable, match="do not share a leading"):
        remat_batch.batch_inputs(j, positions=[0, 0, 1, 1])
    import graphopt
    step, args = _step("mlp")
    f = graphopt.optimize(step, passes=["remat"], memory_budget=0.5)
    out = f(*args)
    rec = next(r for r in f.report(*args).records if r.name == "remat")
    assert rec.stats.hits["remat.micro_batches"] >= 2
    for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(step(*args))):
        assert testing.max_rel_error(x, y) <= 2e-5


def test_streamed_equations_keep_their_name_stacks():
    # ir.bind_eqn re-binds each equation under its own name stack (as jax.core.eval_jaxpr
    # does): the backward inside the loops stays 'transpose(...)', so a micro-batched step
    # is still seen as post-AD and the drawings still tell forward from backward
    from graphopt.passes import placement_of
    step, args = _step("mlp")
    cj = jax.make_jaxpr(step)(*args)
    new = remat_batch.stream(cj, 2)
    (loop,) = _loops(new)
    in_loop = [e for e, _, _ in ir.walk_eqns(loop.params["jaxpr"])]
    assert sum("transpose(" in ir.name_stack(e) for e in in_loop) >= 3
    assert placement_of(new) == "post-AD"


# regressions found in review: each gave a wrong result or crashed before the fix
_X = jnp.arange(8.0).reshape(4, 2) / 10
_W = jnp.array([0.3, -0.2])


def _stream_matches(f, *args, k=2):
    cj = jax.make_jaxpr(f)(*args)
    new = remat_batch.stream(cj, k)
    flat = jax.tree_util.tree_leaves(args)
    for a, b in zip(_outputs(cj, flat), _outputs(new, flat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_scan_rerun_in_a_later_loop_keeps_its_sum():
    # the scan makes batched ys and a sum over the batch; a later loop re-runs it for
    # the ys and must still read the full-batch sum, not one micro-batch's part
    def loss(w, x):
        def body(c, t):
            h = jnp.tanh(x @ w * t)
            return c + jnp.sum(h), h
        s, hs = jax.lax.scan(body, jnp.float32(0), jnp.arange(1.0, 4.0))
        return jnp.sum((hs / s) ** 2)
    _stream_matches(lambda w, x: (w - 0.1 * jax.grad(loss)(w, x), loss(w, x)), _W, _X)


@pytest.mark.parametrize("body, why", [
    (lambda c, p: (p, None), "initial value"),             # overwritten carry
    (lambda c, p: (p - c, None), "initial value"),         # negated carry
    (lambda c, p: (c + p, c + p), "initial value"),        # the running sum emitted
    (lambda c, p: (0.5 * (c + p), None), "initial value"),  # decayed
])
def test_carries_that_are_not_pure_accumulators_are_refused(body, why):
    def f(w, x):
        c, _ = jax.lax.scan(lambda c, t: body(c, jnp.sum(x @ w) * t), jnp.float32(5.0),
                            jnp.arange(3.0))
        return c
    with pytest.raises(remat_batch.Unstreamable, match=why):
        remat_batch.analyse(jax.make_jaxpr(f)(_W, _X))


def test_integer_division_of_a_sum_is_refused():
    def f(w, x):
        def body(c, t):
            cnt = jnp.sum((x[:, 0] * t >= 0).astype(jnp.int32))
            return c + jax.lax.div(cnt, 3), None
        return jax.lax.scan(body, jnp.int32(0), jnp.arange(3.0))[0]
    with pytest.raises(remat_batch.Unstreamable, match="div"):
        remat_batch.analyse(jax.make_jaxpr(f)(_W, _X))


def test_a_batched_carry_that_turns_global_is_refused():
    def f(w, x):
        return jax.lax.scan(lambda c, t: (jnp.zeros_like(x) + w, jnp.sum(c * w)), x,
                            jnp.arange(3.0))
    with pytest.raises(remat_batch.Unstreamable, match="carry"):
        remat_batch.analyse(jax.make_jaxpr(f)(_W, _X))


@pytest.mark.slow  # minutes of compiles: the full leg only (CI leg 1)
def test_micro_batches_over_the_scan_rewrite_recompute_less():
    # at 20% plain micro-batches do not reach, and the scan rewrite alone recomputes every
    # layer from its carry; keeping the dot outputs and running micro-batches meets the
    # budget with fewer FLOPs (asked for: "auto" does not run the layer scans K times over)
    step, args = _step("gpt_scan")
    cj = jax.make_jaxpr(step)(*args)
    ctx = {"memory_budget": 0.2}
    keep = remat.remat_pass(cj, PassContext("post-AD", {**ctx, "remat_micro_batches": False}))
    auto = remat.remat_pass(cj, PassContext("post-AD", ctx))
    assert "remat.micro_batches" not in auto.stats.hits
    res = remat.remat_pass(cj, PassContext("post-AD", {**ctx, "remat_micro_batches": True}))
    assert res.stats.hits["remat.micro_batches"] >= 2
    assert any("scan rewrite (" in n and "micro-batches" in n for n in res.stats.notes)
    assert res.stats.hits["remat.flops_recomputed"] < keep.stats.hits["remat.flops_recomputed"]
    assert remat.xla_temp(res.jaxpr) <= 0.2 * remat.xla_temp(cj) * 1.05
    _assert_same(cj, res.jaxpr, jax.tree_util.tree_leaves(args), 2e-5)


def test_the_note_names_the_argument_taken_as_the_batch():
    # issue 16 item 14: the batch is the last array argument; the note says which argument
    # was split, by its place in the call, and says so too when that choice fails
    import graphopt
    step, args = _step("mlp")
    f = graphopt.optimize(step, passes=["remat"], memory_budget=0.5)
    out = f(*args)
    rec = next(r for r in f.report(*args).records if r.name == "remat")
    assert rec.stats.hits["remat.micro_batches"] >= 2
    n_leaves = len(jax.tree_util.tree_leaves(args[2]))
    note = next(n for n in rec.stats.notes if "runs as" in n)
    assert (f"(argument 'batch', the last array argument of the call: {n_leaves} leaves split along "
            "their leading axis; the 2 argument(s) before it are not split") in note, note
    for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(step(*args))):
        assert testing.max_rel_error(x, y) <= 2e-5

    def batch_first(batch, params, opt_state):  # the batch is not last: opt_state is taken
        return step(params, opt_state, batch)
    g = graphopt.optimize(batch_first, passes=["remat"], memory_budget=0.5,
                          remat_measure="estimate")
    moved = (args[2], args[0], args[1])
    try:
        notes = next(r for r in g.report(*moved).records if r.name == "remat").stats.notes
    except graphopt.BudgetError as e:  # refused: the reason names the argument too
        notes = [str(e)]
    assert any("argument 2 of the call, taken as the batch" in n for n in notes), notes


def test_batch_source_by_name_and_without_a_call():
    axes = [None, 0, 0]
    assert remat_batch.batch_source([0, 1, 1], axes, ["params", "batch"]).startswith(
        "argument 'batch', the last array argument of the call: 2 leaves")
    assert remat_batch.batch_source([0, 1, 1], axes, ["arg0", "arg1"]).startswith("argument 1,")
    assert remat_batch.batch_source([1, 1, 1], axes).endswith("split along their leading axis")
    assert remat_batch.batch_source(None, axes).startswith("flat inputs 1..2")
