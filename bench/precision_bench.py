"""Mixed precision: float32 vs graphopt.optimize(step, precision="bfloat16"), side by side.

For the zoo GPT and CNN training steps (optax Adam, post-AD: the decorator on the whole
step), prints XLA's temp memory (``compiled.memory_analysis().temp_size_in_bytes``),
the median step time, the share of dot/conv FLOPs in bfloat16 and the casts added,
and, for reference, the zoo's hand-written bf16 variant of the GPT (``dtype=bfloat16``).
On CPU the times say little (XLA:CPU has no fast bf16 matmul); memory is the figure.
Memory-aware CPU scheduler: XLA_FLAGS is set below, before JAX starts.

    python bench/precision_bench.py [--quick]
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import sys

import jax
import jax.numpy as jnp

import graphopt
from graphopt.__main__ import median_time
from graphopt.liveness import xla_memory
from graphopt.models import cnn, gpt
from graphopt.transforms.precision import low_flop_share

QUICK = "--quick" in sys.argv
MiB = 2 ** 20


def compare(name, step, args, extra=()):
    base = jax.jit(step)
    fast = graphopt.optimize(step, precision="bfloat16")
    rows = [("float32 (jax.jit)", base), ("precision='bfloat16'", fast)] + list(extra)
    reps = 5 if QUICK else 20
    print(f"\n{name}")
    print(f"  {'variant':<28} {'temp MiB':>9} {'x f32':>6} {'step ms':>8} {'x f32':>6}")
    ref_m = ref_t = None
    for label, fn in rows:
        mem = xla_memory(fn, *args)["temp_bytes"]
        t = median_time(fn, *args, repeats=reps)
        ref_m, ref_t = ref_m or mem, ref_t or t
        print(f"  {label:<28} {mem / MiB:9.2f} {mem / ref_m:6.2f} {1e3 * t:8.2f} {t / ref_t:6.2f}")
    low, tot = low_flop_share(fast.jaxpr(*args))
    det = next(r.stats.details["precision"] for r in fast.report(*args).records
               if r.name == "precision")
    print(f"  dot/conv FLOPs in bfloat16: {100 * low / tot:.1f}%; casts added: "
          f"{det['casts_added']}; params out: "
          f"{sorted({str(x.dtype) for x in jax.tree.leaves(fast(*args)[0])})}")


def main():
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; XLA_FLAGS="
          f"{os.environ['XLA_FLAGS']}")
    sz = dict(n_layers=2, d_model=128, n_heads=4, seq_len=128, vocab=512, batch=8) if QUICK \
        else dict(n_layers=4, d_model=256, n_heads=8, seq_len=256, vocab=2048, batch=8)
    p = gpt.init(jax.random.PRNGKey(0), **sz)
    args = (p, gpt.init_opt_state(p), gpt.example_batch(jax.random.PRNGKey(1), **sz))
    hand = jax.jit(gpt.make_train_step(gpt.optimizer(), dtype=jnp.bfloat16))
    compare(f"GPT train step {sz}", gpt.train_step, args, [("hand-written bf16 (zoo dtype=)", hand)])
    csz = dict(cnn.BENCH_SIZES)
    cp = cnn.init(jax.random.PRNGKey(0), **csz)
    cargs = (cp, cnn.init_opt_state(cp), cnn.example_batch(jax.random.PRNGKey(1), **csz))
    compare(f"CNN train step {csz}", cnn.train_step, cargs)


if __name__ == "__main__":
    main()
