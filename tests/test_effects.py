"""Effects are kept: ``jax.debug.print``/``jax.debug.callback`` and ``io_callback`` fire
exactly as often (and, where ordered, in the same order) after every pass as in the
unoptimized function, inside scan, cond and while, and under grad/jit/vmap."""
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import io_callback

import graphopt
from graphopt import ir

EVENTS: list = []
F32 = jax.ShapeDtypeStruct((), jnp.float32)


def dbg(tag, v):
    jax.debug.callback(lambda t, x: EVENTS.append(("dbg", tag, float(x))), tag, v)


def io(tag, v, ordered=False):
    def cb(t, x):
        EVENTS.append(("io", int(t), float(x)))
        return np.float32(x)
    return io_callback(cb, F32, tag, lax.stop_gradient(v), ordered=ordered)


def events(fn, *args):
    EVENTS.clear()
    jax.block_until_ready(fn(*args))
    jax.effects_barrier()
    return list(EVENTS)


def in_scan(xs):
    def body(c, x):
        dbg(0, x)
        dbg(0, x)                       # identical twin: CSE must not merge
        io(1, x * 1.0)                  # result unused: DCE must not drop
        y = io(2, x, ordered=True)
        dbg(3, jnp.float32(2.0) * 3.0)  # constant input: fold must not run it
        return c + jnp.sin(x) + 0.0 * y, jnp.cos(x) * 1.0
    return lax.scan(body, 0.0, xs)[0]


def in_cond(xs):
    def one(c, x):
        return lax.cond(x > 0, lambda v: (dbg(10, v), io(11, v), v * 2.0)[-1],
                        lambda v: (io(12, v, ordered=True), v - 0.0)[-1], x) + c, None
    return lax.scan(one, 0.0, xs)[0]


def in_while(x0):
    def body(c):
        i, v = c
        dbg(20, v)
        io(21, v)
        return i + 1, v * 1.0 + 1.0
    return lax.while_loop(lambda c: c[0] < 3, body, (0, x0.sum()))[1]


def at_top(x):
    dbg(30, x.sum())
    _ = io(31, x.sum(), ordered=True)
    _ = jnp.exp(x)  # dead
    dbg(30, x.sum())
    return jnp.sum(x * 1.0)


PROGRAMS = {"scan": in_scan, "cond": in_cond, "while": in_while, "top": at_top}
XS = jnp.array([0.5, -1.0, 2.0], jnp.float32)


@pytest.mark.parametrize("passes", [["dce"], ["fold"], ["cse"], ["simplify"], None],
                         ids=["dce", "fold", "cse", "simplify", "default"])
@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_effects_fire_as_often_as_before(prog, passes):
    f = PROGRAMS[prog]
    want = events(jax.jit(f), XS)
    assert want, "the program should fire callbacks"
    opt = graphopt.optimize(f, passes=passes)
    got = events(opt, XS)
    assert sorted(got) == sorted(want)
    ordered = [e for e in want if e[0] == "io" and e[1] in (2, 12, 31)]
    assert [e for e in got if e in ordered] == ordered  # ordered effects keep their order
    np.testing.assert_allclose(opt(XS), f(XS), rtol=1e-6)


@pytest.mark.parametrize("prog", ["scan", "cond", "top"])
def test_effects_under_grad(prog):
    f = PROGRAMS[prog]
    want = events(jax.jit(jax.grad(f)), XS)
    opt = graphopt.optimize(f)
    got = events(jax.grad(opt), XS)
    assert sorted(got) == sorted(want)
    # grad inside the optimized function (post-AD placement)
    got2 = events(graphopt.optimize(jax.grad(f)), XS)
    assert sorted(got2) == sorted(want)
    np.testing.assert_allclose(jax.grad(opt)(XS), jax.grad(f)(XS), rtol=1e-6)


def test_debug_callback_under_vmap_and_jit():
    def f(x):
        dbg(40, x)
        return jnp.sin(x) * 1.0
    want = events(jax.jit(jax.vmap(f)), XS)
    assert len(want) == 3
    got = events(jax.jit(jax.vmap(graphopt.optimize(f))), XS)
    assert sorted(got) == sorted(want)


def test_debug_print_lines(capfd):
    def f(xs):
        def body(c, x):
            jax.debug.print("step {x}", x=x)
            jax.debug.print("step {x}", x=x)
            return c + x * 1.0, None
        c = lax.scan(body, 0.0, xs)[0]
        jax.debug.print("done {c}", c=c)
        return c

    def lines(fn):
        capfd.readouterr()
        jax.block_until_ready(fn(XS))
        jax.effects_barrier()
        return sorted(l for l in capfd.readouterr().out.splitlines() if l)
    want = lines(jax.jit(f))
    assert len(want) == 7
    assert lines(graphopt.optimize(f)) == want
    assert lines(jax.grad(graphopt.optimize(f))) == lines(jax.jit(jax.grad(f)))


def test_effectful_equations_survive_in_the_jaxpr():
    opt = graphopt.optimize(in_scan)
    before = ir.primitive_counts(opt.original_jaxpr(XS))
    after = ir.primitive_counts(opt.jaxpr(XS))
    for p in ("debug_callback", "io_callback"):
        assert after[p] == before[p], p
    # while the pure redundancy around them went away
    assert ir.count_eqns(opt.jaxpr(XS)) < ir.count_eqns(opt.original_jaxpr(XS))


# ------------------------------------------------- every pass, remat and micro-batches
# Unordered callbacks may run in any order (JAX promises none, even between two runs of
# the same program), so they are compared by count and values; ordered debug callbacks
# ("tap") and ordered io_callbacks are also compared in order, each stream on its own
# (JAX orders each ordered effect type by its own token, not the two against each other).

ORDERED_IO = (2, 12, 31, 51, 61)


def tap(tag, v):
    jax.debug.callback(lambda t, x: EVENTS.append(("tap", int(t), float(x))), tag, v,
                       ordered=True)


def assert_same_effects(got, want):
    key = lambda e: e[:2]  # noqa: E731
    assert Counter(map(key, got)) == Counter(map(key, want))  # each fires as often
    for k in set(map(key, want)):
        np.testing.assert_allclose(sorted(e[2] for e in got if key(e) == k),
                                   sorted(e[2] for e in want if key(e) == k), rtol=2e-5)
    for stream in (lambda e: e[0] == "tap", lambda e: e[0] == "io" and e[1] in ORDERED_IO):
        assert [key(e) for e in got if stream(e)] == [key(e) for e in want if stream(e)]


_R = np.random.default_rng(0)


def _w(*shape):
    return jnp.asarray(_R.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)


WQ, WK, WV, WC, WD = _w(8, 16), _w(8, 16), _w(8, 16), _w(16, 64), _w(64, 2)
X512 = jnp.asarray(_R.standard_normal((512, 8)), jnp.float32)


def fusable(x):
    """Parallel dots, a hand-written attention and a matmul chain, each fused by its pass
    on these shapes, between effects that read their inputs and outputs."""
    tap(50, x.sum())
    q, k, v = x @ WQ, x @ WK, x @ WV
    o = jax.nn.softmax((q @ k.T) / 4.0, axis=-1) @ v
    dbg(52, o.sum())
    _ = io(51, o[0, 0], ordered=True)
    c = (o @ WC) @ WD
    tap(53, c.sum())
    return jnp.sum(c)


@jax.custom_vjp
def _bwd_probe(x):
    return x


def _bwd_probe_bwd(_, g):
    tap(79, jnp.sum(g))  # an effect in the backward pass
    return (g,)


_bwd_probe.defvjp(lambda x: (x, None), _bwd_probe_bwd)


def make_loss(effects=True):
    """A residual MLP's loss with effects in each block, in the backward and on the loss;
    6 blocks so that choosing what to keep reaches half the step's memory."""
    def loss(params, batch):
        x, y = batch
        for i, p in enumerate(params):
            h = jax.nn.relu(x @ p["w1"])
            if effects:
                tap(80 + i, jnp.mean(h))
            x = x + h @ p["w2"]
        x = _bwd_probe(x) if effects else x
        out = jnp.mean((x - y) ** 2)
        if effects:
            dbg(70, out)
        return out
    return loss


def make_step(effects=True):
    """The loss's SGD step (post-AD), with an ordered io_callback after the gradient."""
    loss = make_loss(effects)

    def step(params, batch):
        out, g = jax.value_and_grad(loss)(params, batch)
        if effects:
            io(61, out, ordered=True)
        return jax.tree.map(lambda p, d: p - 0.1 * d, params, g), out
    return step


STEP = make_step()
STEP_ARGS = ([{"w1": _w(16, 64), "w2": _w(64, 16) / 3} for _ in range(6)],
             (jnp.asarray(_R.standard_normal((4, 32, 16)), jnp.float32),
              jnp.asarray(_R.standard_normal((4, 32, 16)), jnp.float32)))
ALL_PROGRAMS = {**{k: (f, (XS,)) for k, f in PROGRAMS.items()},
                "fusable": (fusable, (X512,)), "step": (STEP, STEP_ARGS)}
GRAD_PROGRAMS = ("scan", "cond", "top", "fusable")  # while loops have no reverse mode
_WANT: dict = {}


def original_events(prog, grad=False):
    if (prog, grad) not in _WANT:  # the unoptimized program's effects, once per module
        f, args = ALL_PROGRAMS[prog]
        _WANT[prog, grad] = events(jax.jit(jax.grad(f) if grad else f), *args)
    return _WANT[prog, grad]


@pytest.mark.parametrize("name", graphopt.registered_passes())  # groups included
@pytest.mark.parametrize("prog", sorted(ALL_PROGRAMS))
def test_each_registered_pass_keeps_effects(prog, name):
    f, args = ALL_PROGRAMS[prog]
    want = original_events(prog)
    assert want
    assert_same_effects(events(graphopt.optimize(f, passes=[name]), *args), want)
    if prog in GRAD_PROGRAMS:
        want = original_events(prog, grad=True)
        assert_same_effects(events(jax.grad(graphopt.optimize(f, passes=[name])), *args), want)
        assert_same_effects(events(graphopt.optimize(jax.grad(f), passes=[name]), *args), want)


def test_fusable_program_is_fused_around_its_effects():
    # otherwise the per-pass test above would not exercise the fusions at all
    rep = graphopt.optimize(fusable, passes=["fuse"], parallel_dots="always").report(X512)
    hits = {h for r in rep.records for h in r.stats.hits}
    assert {"fuse.attention", "fuse.parallel_dots", "fuse.matmul_chain"} <= hits


def _remat_record(opt, *args):
    return next(r for r in opt.report(*args).records if r.name == "remat")


REMAT_OPTS = dict(remat_measure="estimate", remat_solver="greedy")  # deterministic and quick


@pytest.mark.parametrize("micro", [False, True])
def test_remat_keeps_effects_of_a_training_step(micro):
    opt = graphopt.optimize(STEP, memory_budget=0.5, remat_micro_batches=micro, **REMAT_OPTS)
    assert_same_effects(events(opt, *STEP_ARGS), original_events("step"))
    rec = _remat_record(opt, *STEP_ARGS)
    assert rec.changed and rec.stats.hits["remat.segment"] > 0  # it did recompute
    assert "remat.micro_batches" not in rec.stats.hits
    if micro:  # the refusal is in the report, not a silent fallback
        assert any("micro-batching not possible" in n and "has effects" in n
                   for n in rec.stats.notes), rec.stats.notes


def test_without_effects_the_same_step_is_micro_batched():
    # the control: only the effects stopped micro-batching above
    opt = graphopt.optimize(make_step(effects=False), memory_budget=0.6,
                            remat_micro_batches=True, **REMAT_OPTS)
    assert _remat_record(opt, *STEP_ARGS).stats.hits["remat.micro_batches"] >= 2


def test_budget_only_micro_batches_could_reach_names_the_effect():
    from graphopt.transforms.remat import BudgetError
    opt = graphopt.optimize(STEP, memory_budget=0.05, **REMAT_OPTS)
    with pytest.raises(BudgetError, match="micro-batching not possible: .*has effects"):
        opt(*STEP_ARGS)


def test_pre_ad_remat_keeps_effects_under_grad():
    # segments holding an effect are not wrapped: only the effect-free blocks are
    loss = make_loss()
    r = graphopt.remat(loss, memory_budget=0.95)
    want = events(jax.jit(jax.grad(loss)), *STEP_ARGS)
    assert_same_effects(events(jax.jit(jax.grad(r)), *STEP_ARGS), want)
    info = r.info(*STEP_ARGS)
    assert info["bytes"] < info["base_bytes"], info


def make_rnn_step(effects=True):
    """An RNN's SGD step: a forward scan whose body holds an ordered debug callback, the
    backward scan reading its stacked residuals."""
    def loss(p, batch):
        xs, y = batch

        def body(h, x):
            h = jnp.tanh(h @ p["wh"] + x @ p["wx"])
            if effects:
                tap(90, h.sum())
            return h, h
        _, hs = lax.scan(body, jnp.zeros((xs.shape[1], p["wh"].shape[0])), xs)
        return jnp.mean((hs @ p["wo"] - y) ** 2)

    def step(p, batch):
        out, g = jax.value_and_grad(loss)(p, batch)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), out
    return step


RNN_ARGS = ({"wh": _w(64, 64), "wx": _w(8, 64), "wo": _w(64, 4)},
            (jnp.asarray(_R.standard_normal((32, 16, 8)), jnp.float32),
             jnp.asarray(_R.standard_normal((32, 16, 4)), jnp.float32)))


def test_scan_step_without_effects_gets_the_scan_rewrite():
    # the control for the test below: at this budget only the scan rewrite gets there
    opt = graphopt.optimize(make_rnn_step(effects=False), memory_budget=0.75, **REMAT_OPTS)
    assert _remat_record(opt, *RNN_ARGS).stats.hits["remat.scan_residuals_dropped"] > 0


def test_scan_rewrite_refused_for_effects_says_so():
    from graphopt.transforms.remat import BudgetError
    opt = graphopt.optimize(make_rnn_step(), memory_budget=0.75, **REMAT_OPTS)
    with pytest.raises(BudgetError) as err:
        opt(*RNN_ARGS)
    others = str(err.value).replace("micro-batching not possible: scan has effects", "")
    assert re.search(r"scan.*effect", others), str(err.value)
