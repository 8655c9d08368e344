"""Parallel-branch batching: repeated branches written as Python loops, batched vs not.

1. An ensemble of 8 small MLPs (16 -> 64 -> 64 -> 4, batch 32) written as a Python loop,
   its mean prediction's squared error differentiated (``jax.value_and_grad`` outside
   the decorated loss, pre-AD) and as a whole step (``graphopt.optimize`` on the step,
   post-AD).
2. A transformer block (d=64, 8 heads of 8, T=32, batch 4) whose heads are a Python loop.

Variants in the same run: the plain jitted function, ``graphopt.optimize`` with the
default pipeline (the cost model decides: on CPU it declines), and
``batch_parallel="force"``. Printed: dot_general counts, outputs and gradients against
the baseline (max relative error), median time per call and the ratio to the loop.

    python bench/parallel_bench.py [--quick]
"""
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import graphopt
from graphopt import ir, parallelism, testing

QUICK = "--quick" in sys.argv
REPS = 60 if QUICK else 300


# ------------------------------------------------------------------------ models

def ensemble_init(key, k=8, d=16, h=64, o=4):
    ps = []
    for kk in jax.random.split(key, k):
        k1, k2, k3 = jax.random.split(kk, 3)
        ps.append({"w1": jax.random.normal(k1, (d, h)) / d**0.5, "b1": jnp.zeros(h),
                   "w2": jax.random.normal(k2, (h, h)) / h**0.5, "b2": jnp.zeros(h),
                   "w3": jax.random.normal(k3, (h, o)) / h**0.5, "b3": jnp.zeros(o)})
    return ps


def ensemble_loss(ps, x, y):
    preds = []
    for p in ps:  # the loop the pass batches
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        preds.append(h @ p["w3"] + p["b3"])
    return jnp.mean((jnp.mean(jnp.stack(preds), 0) - y) ** 2)


def heads_init(key, d=64, n_heads=8):
    dh = d // n_heads
    ks = jax.random.split(key, 3 * n_heads + 1)
    heads = [{"q": jax.random.normal(ks[3 * i], (d, dh)) / d**0.5,
              "k": jax.random.normal(ks[3 * i + 1], (d, dh)) / d**0.5,
              "v": jax.random.normal(ks[3 * i + 2], (d, dh)) / d**0.5} for i in range(n_heads)]
    return {"heads": heads, "o": jax.random.normal(ks[-1], (d, d)) / d**0.5}


def heads_loss(p, x):
    outs = []
    for hp in p["heads"]:  # one head per iteration
        q, k, v = x @ hp["q"], x @ hp["k"], x @ hp["v"]
        s = jnp.einsum("btd,bsd->bts", q, k) / q.shape[-1] ** 0.5
        outs.append(jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, -1), v))
    y = x + jnp.concatenate(outs, -1) @ p["o"]
    return jnp.mean(y ** 2)


# ------------------------------------------------------------------------ timing

def timed(fns: dict, args, reps: int, block: int = 10) -> dict:
    """Median seconds per call; blocks of consecutive calls, the variants taking turns."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(max(1, reps // block)):
        for k in names[r % len(names):] + names[:r % len(names)]:
            jax.block_until_ready(fns[k](*args))
            for _ in range(block):
                t0 = time.perf_counter()
                jax.block_until_ready(fns[k](*args))
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def dots(cj) -> int:
    return ir.primitive_counts(cj).get("dot_general", 0)


def case(title, loss, args, step_too=True, extra=()):
    print(f"\n== {title}")
    print(parallelism.analyze(loss, *args))
    flat = jax.tree_util.tree_leaves(args)
    variants = {"loop (jit)": jax.jit(jax.value_and_grad(loss))}
    counts = {"loop (jit)": dots(jax.make_jaxpr(loss)(*args))}
    for name, opts in [("default pipeline", {}), ("forced", {"batch_parallel": "force"}),
                       *extra]:
        opt = graphopt.optimize(loss, **opts)
        counts[name] = dots(opt.jaxpr(*args))
        variants[name] = jax.jit(jax.value_and_grad(opt))
        recs = [r for r in opt.report(*args).records if r.name == "batch_parallel"]
        for n in dict.fromkeys(n for r in recs for n in r.stats.notes):
            print(f"  {name}: {n}")
        if not opts and jax.default_backend() == "cpu":  # on CPU the cost model declines
            assert not any(r.changed for r in recs), "batch_parallel fired on CPU"
    if step_too:
        step = jax.value_and_grad(loss)
        counts["loop (jit), step"] = dots(jax.make_jaxpr(step)(*args))
        variants["loop (jit), step"] = jax.jit(step)
        for name, opts in [("default, step", {}), ("forced, step", {"batch_parallel": "force"})]:
            opt = graphopt.optimize(step, **opts)
            counts[name] = dots(opt.jaxpr(*args))
            variants[name] = opt
    ref = variants["loop (jit)"](*args)
    for name, f in variants.items():
        got = f(*args)
        errs = [testing.max_rel_error(a, b) for a, b in
                zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got))]
        assert max(errs) < 1e-5, (name, max(errs))
    times = timed(variants, args, REPS)
    print(f"{'variant':22s} {'dots':>5s} {'max rel err':>12s} {'us/call':>9s} {'vs loop':>8s}")
    for name, f in variants.items():
        base = times["loop (jit), step"] if "step" in name else times["loop (jit)"]
        errs = [testing.max_rel_error(a, b) for a, b in
                zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(f(*args)))]
        print(f"{name:22s} {counts[name]:5d} {max(errs):12.2e} {times[name] * 1e6:9.1f} "
              f"{base / times[name]:7.2f}x")
    del flat
    return counts, times


def main():
    print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
    key = jax.random.key(0)
    ps = ensemble_init(key)
    x = jax.random.normal(jax.random.key(1), (32, 16))
    y = jax.random.normal(jax.random.key(2), (32, 4))
    counts, times = case("ensemble of 8 MLPs as a Python loop (value_and_grad)", ensemble_loss,
                         (ps, x, y))
    assert counts["loop (jit)"] == 24 and counts["forced"] <= 3, counts
    hp = heads_init(jax.random.key(3))
    xh = jax.random.normal(jax.random.key(4), (4, 32, 64))
    # the default pipeline's fuse_parallel_dots merges the 24 q/k/v projections (one x):
    # the row without it tells its effect from batch_parallel's (which declines on CPU)
    case("transformer block, 8 heads as a Python loop (value_and_grad)", heads_loss, (hp, xh),
         extra=[("default, no par. dots", {"parallel_dots": "never"})])
    if jax.default_backend() == "cpu":
        slow = times["loop (jit)"] / times["default pipeline"]
        print(f"\ndefault pipeline vs loop on CPU (ensemble): {slow:.2f}x")


if __name__ == "__main__":
    main()
