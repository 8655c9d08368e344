"""Effects are kept: ``jax.debug.print``/``jax.debug.callback`` and ``io_callback`` fire
exactly as often (and, where ordered, in the same order) after every pass as in the
unoptimized function, inside scan, cond and while, and under grad/jit/vmap."""
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
