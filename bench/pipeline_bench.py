"""How long graphopt's pipeline takes, beside tracing and XLA compilation.

Synthetic programs of about 1k, 10k and 100k equations (elementwise ops and small
matmuls, with redundancy: repeated subexpressions, identities, dead values), then the
zoo's training steps (MLP, CNN, GPT, RNN, and a 24-layer GPT step of ~10k equations).
For each: ``jax.make_jaxpr`` trace time, the default pipeline's time as
``graphopt.optimize`` runs it (interface checks; the full type check is a test-time flag),
and for the synthetic ones XLA's compile time of the traced and of the pruned program.
Targets: pipeline time at most half the trace time at 10k equations and on the training
steps, and 10x more equations costs at most 12x more pipeline time.

    python bench/pipeline_bench.py [--sizes 1000 10000 100000] [--no-compile] [--no-zoo]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import graphopt
from graphopt import ir, progress


def synthetic(n_eqns: int):
    """A function whose jaxpr has about ``n_eqns`` equations, a third of them redundant."""
    blocks = max(1, n_eqns // 12)

    def f(x, w):
        acc = x
        for i in range(blocks):
            a = jnp.sin(acc) * 1.0          # mul by one: simplify
            b = jnp.sin(acc)                # duplicate of sin(acc): CSE
            c = (a + b) @ w                 # real work
            d = jnp.cos(c) + 0.0            # add zero: simplify
            jnp.exp(c) * 3.0                # never used: DCE
            e = jnp.tanh(d) - jnp.tanh(d)   # x - x is kept (NaN semantics), tanh(d) is CSE'd
            acc = acc + c * 0.5 + e
        return acc

    return f


def time_it(fn, repeats: int, min_seconds: float = 0.5) -> float:
    """Median seconds of ``fn()`` after one warm-up call, over at least ``repeats`` calls
    and at least ``min_seconds`` in all (small programs: enough calls to beat the noise)."""
    fn()
    ts = []
    while len(ts) < repeats or sum(ts) < min_seconds:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(sizes, compile_xla: bool = True):
    x = jnp.ones((8, 16), jnp.float32)
    w = jnp.ones((16, 16), jnp.float32) * 0.01
    rows = []
    for n in sizes:
        f = synthetic(n)
        repeats = 3 if n <= 10_000 else 1
        cj = jax.make_jaxpr(f)(x, w)
        # A fresh function each time: make_jaxpr caches traces of the same function.
        t_trace = time_it(lambda: jax.make_jaxpr(synthetic(n))(x, w), repeats)
        pipe = graphopt.Pipeline(graphopt.default_passes(), check=True)
        t_pipe = time_it(lambda: pipe.run(cj), repeats)
        opt, _ = pipe.run(cj)
        row = dict(n=ir.count_eqns(cj), n_after=ir.count_eqns(opt), trace=t_trace, pipe=t_pipe)
        if compile_xla:
            row["xla"] = time_it(lambda: jax.jit(lambda a, b: ir.eval_jaxpr(cj, a, b)).lower(x, w).compile(), 1)
            row["xla_opt"] = time_it(lambda: jax.jit(lambda a, b: ir.eval_jaxpr(opt, a, b)).lower(x, w).compile(), 1)
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(r) -> str:
    s = (f"{r['n']:>8} eqns -> {r['n_after']:<7} trace {r['trace']:8.3f} s   pipeline {r['pipe']:8.3f} s"
         f"   pipeline/trace {r['pipe'] / r['trace']:5.2f}")
    if "xla" in r:
        s += f"   XLA compile {r['xla']:7.2f} s -> {r['xla_opt']:7.2f} s pruned ({r['xla'] / r['xla_opt']:.2f}x)"
    return s


def zoo_steps():
    """(name, fresh-step factory, args) for the zoo's training steps."""
    from graphopt.models import cnn, gpt, mlp, rnn
    key = jax.random.PRNGKey(0)
    out = []
    for name, mod in (("mlp", mlp), ("cnn", cnn), ("rnn", rnn)):
        p = mod.init(key)
        out.append((name, lambda mod=mod: mod.make_train_step(mod.optimizer()),
                    (p, mod.init_opt_state(p), mod.example_batch(key))))
    for layers in (2, 24):
        sizes = dict(n_layers=layers, d_model=64, n_heads=4, seq_len=32, vocab=256)
        p = gpt.init(key, **sizes)
        out.append((f"gpt {layers} layers", lambda: gpt.make_train_step(gpt.optimizer()),
                    (p, gpt.init_opt_state(p), gpt.example_batch(key, batch=2, **sizes))))
    return out


def run_zoo():
    rows = []
    pipe = graphopt.Pipeline(graphopt.default_passes(), check=True)
    for name, make, args in zoo_steps():
        cj = jax.make_jaxpr(make())(*args)
        t_trace = time_it(lambda: jax.make_jaxpr(make())(*args), 3)
        t_pipe = time_it(lambda: pipe.run(cj), 3)
        opt, _ = pipe.run(cj)
        row = dict(name=name, n=ir.count_eqns(cj), n_after=ir.count_eqns(opt), trace=t_trace,
                   pipe=t_pipe)
        rows.append(row)
        print(f"{name:>16}: " + _fmt(row), flush=True)
    worst = max(rows, key=lambda r: r["pipe"] / r["trace"])
    print(f"training steps: worst pipeline/trace = {worst['pipe'] / worst['trace']:.2f} "
          f"({worst['name']}; target <= 0.5)")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, 100_000])
    ap.add_argument("--no-compile", action="store_true", help="skip XLA compile times")
    ap.add_argument("--compile-max", type=int, default=10_000,
                    help="largest program to compile with XLA (compiles are slow)")
    ap.add_argument("--no-zoo", action="store_true", help="skip the zoo's training steps")
    ns = ap.parse_args()
    print(f"graphopt pipeline benchmark ({jax.default_backend()}, JAX {jax.__version__}); "
          f"passes: {graphopt.default_passes()}")
    rows = []
    for n in progress.track(ns.sizes, "program sizes"):
        rows += run([n], compile_xla=not ns.no_compile and n <= ns.compile_max)
    by_n = {r["n"]: r for r in rows}
    ns_sorted = sorted(by_n)
    print("\nscaling (10x equations -> pipeline time ratio, target <= 12x):")
    for a, b in zip(ns_sorted, ns_sorted[1:]):
        print(f"  {a:>7} -> {b:<7} eqns ({b / a:4.1f}x): pipeline {by_n[b]['pipe'] / by_n[a]['pipe']:5.2f}x")
    if ns_sorted:  # `--sizes` with no sizes: the zoo only
        mid = min(ns_sorted, key=lambda n: abs(n - 10_000))
        r = by_n[mid]
        print(f"at {mid} eqns: pipeline/trace = {r['pipe'] / r['trace']:.2f} (target <= 0.5)")
    if not ns.no_zoo:
        print("\nthe zoo's training steps (default pipeline as graphopt.optimize runs it):")
        run_zoo()


if __name__ == "__main__":
    main()
