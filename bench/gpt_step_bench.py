"""The GPT training step of DESIGN.md, by hand and through graphopt, in one run.

Variants (step time median and XLA temp memory each, baseline first):

- fp32 naive attention, no remat (what people write first);
- bf16 matmuls, naive attention;
- bf16, the loss through ``graphopt.optimize`` (attention fused; ``jax.grad`` outside);
- bf16 with ``jax.nn.dot_product_attention`` written by hand (cuDNN on GPU);
- fp32 step through ``graphopt.optimize(step, memory_budget=0.25)`` (post-AD remat);
- fp32 with ``jax.checkpoint(nothing_saveable)`` per block, by hand.

    python bench/gpt_step_bench.py            # DESIGN.md sizes (a GPU; record in bench/RESULTS.md)
    python bench/gpt_step_bench.py --tiny     # a CPU smoke run of the same code
    python bench/gpt_step_bench.py --only bf16 bf16+graphopt
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

import graphopt
from graphopt import analysis
from graphopt.__main__ import median_time
from graphopt.models import gpt
from graphopt.models._common import make_train_step

DESIGN_SIZES = dict(n_layers=12, d_model=1024, n_heads=16, seq_len=1024, vocab=8192, batch=8)
TINY_SIZES = dict(n_layers=2, d_model=64, n_heads=4, seq_len=64, vocab=256, batch=2)


def _hand_attention(q, k, v, causal=True):
    """What a user writes with the library call (cuDNN on GPU, XLA elsewhere)."""
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def _loss_with_hand_attention(params, batch, dtype):
    orig = gpt.attention
    gpt.attention = _hand_attention  # the model looks its attention up at trace time
    try:
        return gpt.loss(params, batch, dtype=dtype)
    finally:
        gpt.attention = orig


def variants(opt):
    bf16 = jnp.bfloat16
    return {
        "fp32": make_train_step(gpt.loss, opt),
        "bf16": make_train_step(functools.partial(gpt.loss, dtype=bf16), opt),
        "bf16+graphopt": make_train_step(
            graphopt.optimize(functools.partial(gpt.loss, dtype=bf16),
                              passes=["prune", "fuse_attention"]), opt),
        "bf16+hand-attention": make_train_step(
            functools.partial(_loss_with_hand_attention, dtype=bf16), opt),
        "fp32+graphopt-remat25%": graphopt.optimize(make_train_step(gpt.loss, opt), memory_budget=0.25),
        "fp32+nothing_saveable": make_train_step(functools.partial(
            gpt.loss, block_remat=jax.checkpoint_policies.nothing_saveable), opt),
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    ap.add_argument("--only", nargs="*", default=None, help="subset of variant names")
    ap.add_argument("--repeats", type=int, default=20)
    ns = ap.parse_args(argv)
    sizes = TINY_SIZES if ns.tiny else DESIGN_SIZES
    params = gpt.init(jax.random.PRNGKey(0), **sizes)
    batch = gpt.example_batch(jax.random.PRNGKey(1), **sizes)
    opt = gpt.optimizer()
    state = opt.init(params)
    device = jax.devices()[0]
    print(f"GPT step {sizes} on {device.platform} ({getattr(device, 'device_kind', '')}), JAX {jax.__version__}")
    rows = []
    for name, step in variants(opt).items():
        if ns.only and name not in ns.only:
            continue
        fn = jax.jit(step)
        try:
            temp = analysis.xla_memory(fn, params, state, batch)["temp_bytes"]
            t = median_time(fn, params, state, batch, repeats=ns.repeats)
            loss = float(fn(params, state, batch)[2])
        except Exception as exc:  # one variant failing (e.g. an infeasible budget) should not stop the table
            print(f"{name:<24} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        rows.append((name, t, temp, loss))
        print(f"{name:<24} {t * 1e3:9.2f} ms  {analysis.fmt_bytes(temp):>11}  loss {loss:.5f}", flush=True)
    if rows:
        base_t, base_m = rows[0][1], rows[0][2]
        print(f"\nagainst {rows[0][0]}:")
        for name, t, m, _ in rows:
            print(f"  {name:<24} speed {base_t / t:5.2f}x   temp memory {m / max(base_m, 1):5.2f}x")
    return rows


if __name__ == "__main__":
    main()
