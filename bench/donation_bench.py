"""Donation on the zoo GPT training step (optax Adam), CPU: baseline vs donate="auto".

Prints, side by side, XLA's compiled memory figures of the step without and with
donation (aliased bytes, temp, peak = arguments + outputs - aliased + temp) against the
bytes of parameters + optimizer state, and checks that 50 donated steps give parameters
bit-identical to 50 undonated ones.

    .venv/bin/python bench/donation_bench.py [--size tiny|small] [--steps 50]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import graphopt
from graphopt.models import gpt

SIZES = {"tiny": gpt.SIZES,
         "small": dict(n_layers=4, d_model=128, n_heads=4, seq_len=64, vocab=512, batch=4)}


def figures(f, *args) -> dict:
    ma = f.lower(*args).compile().memory_analysis()
    out = dict(alias=ma.alias_size_in_bytes, temp=ma.temp_size_in_bytes,
               args=ma.argument_size_in_bytes, outs=ma.output_size_in_bytes)
    out["peak"] = out["args"] + out["outs"] - out["alias"] + out["temp"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--steps", type=int, default=50)  # at least 2
    a = ap.parse_args()
    s = SIZES[a.size]
    k = jax.random.PRNGKey(0)
    p = gpt.init(k, **s)
    o = gpt.init_opt_state(p)
    b = gpt.example_batch(k, **s)
    state = sum(x.nbytes for x in jax.tree_util.tree_leaves((p, o)))
    base = graphopt.optimize(gpt.train_step)
    don = graphopt.optimize(gpt.train_step, donate="auto")
    print(f"GPT {a.size} {s}; backend {jax.default_backend()}; params + Adam state "
          f"{state} bytes")
    print(next(n for n in base.report(p, o, b).notes() if n.startswith("donate")))
    fb, fd = figures(base, p, o, b), figures(don, p, o, b)
    print(f"{'':>24}{'baseline':>14}{'donate=auto':>14}")
    for key in ("args", "outs", "alias", "temp", "peak"):
        print(f"{key + ' bytes':>24}{fb[key]:>14}{fd[key]:>14}")
    print(f"aliased / (params + opt state): {fd['alias'] / state:.3f}")
    drop = fb["peak"] - fd["peak"]
    print(f"peak falls by {drop} bytes = {drop / state:.3f} of params + opt state "
          f"(temp grows by {fd['temp'] - fb['temp']} bytes: XLA's copies of donated inputs)")

    p2, o2 = jax.tree_util.tree_map(jnp.copy, (p, o))
    p1, o1, _ = base(p, o, b)  # the first step of each compiles: not timed
    p2, o2, _ = don(p2, o2, b)
    jax.block_until_ready((p1, p2))
    t0 = time.perf_counter()
    for _ in range(a.steps - 1):
        p1, o1, _ = base(p1, o1, b)
    jax.block_until_ready(p1)
    t1 = time.perf_counter()
    for _ in range(a.steps - 1):
        p2, o2, _ = don(p2, o2, b)
    jax.block_until_ready(p2)
    t2 = time.perf_counter()
    same = all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves((p1, o1)),
                                                     jax.tree_util.tree_leaves((p2, o2))))
    print(f"{a.steps} steps: parameters and optimizer state bit-identical: {same}; "
          f"{(t1 - t0) / (a.steps - 1) * 1e3:.2f} ms/step baseline, "
          f"{(t2 - t1) / (a.steps - 1) * 1e3:.2f} ms/step donated (after the first step; "
          "a loaded machine makes these noisy)")


if __name__ == "__main__":
    main()
