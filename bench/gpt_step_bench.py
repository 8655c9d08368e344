"""The reference GPT training step (12 layers, d=1024, 16 heads, T=1024, vocabulary 8192,
batch 8), by hand and through graphopt, in one run.

Variants (step time median and XLA temp memory each, against the first):

- fp32 naive attention, no remat (what people write first);
- fp32 step through ``graphopt.optimize(step, memory_budget=0.25)`` (post-AD remat; the
  GPT has no batch norm, so the pass runs it as micro-batches: gradient accumulation);
- fp32 with ``jax.checkpoint(nothing_saveable)`` per block, by hand;
- fp32, the loss through ``graphopt.remat(loss, memory_budget=...)`` (pre-AD), the budget
  25% of the fp32 step's temp memory;
- fp32 step, post-AD remat choosing what to keep only (``remat_micro_batches=False``);
- fp32 with ``jax.checkpoint(dots_with_no_batch_dims_saveable)`` per block, by hand;
- bf16 matmuls, naive attention;
- bf16, the loss through ``graphopt.optimize`` (default pipeline; ``jax.grad`` outside);
- bf16, the loss through ``graphopt.optimize(passes=["prune", "fuse_attention"])``;
- bf16 with ``jax.nn.dot_product_attention`` written by hand (cuDNN on GPU).

Rows run in the order above (``--only`` picks a subset); ``--deadline`` skips the rows
that would start after it, so a run on a lent GPU returns its first rows even when
compiles are slow.

    python bench/gpt_step_bench.py            # the reference sizes (a GPU; record in bench/RESULTS.md)
    python bench/gpt_step_bench.py --tiny     # a CPU smoke run of the same code
    python bench/gpt_step_bench.py --only bf16 bf16+graphopt
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

import graphopt
from graphopt import analysis
from graphopt.__main__ import median_time
from graphopt.models import gpt
from graphopt.models._common import make_train_step

REFERENCE_SIZES = dict(n_layers=12, d_model=1024, n_heads=16, seq_len=1024, vocab=8192, batch=8)
TINY_SIZES = dict(n_layers=2, d_model=64, n_heads=4, seq_len=128, vocab=256, batch=2)
# The fence variants the 12-layer GPT step keeps on CPU: one floor compile instead of 8.
FIXED_REMAT = dict(remat_order_backward=False, remat_narrow_fence=True, remat_skip_kept=True)


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


def variants(opt, budget, remat_options, measured, pre_solver="auto"):
    """name -> a thunk making the (unjitted) step; built lazily so skipped rows cost nothing.

    ``measured``: temp bytes of the rows run so far; the pre-AD row's budget is the
    fraction of the fp32 step's (``graphopt.remat`` alone would take it of the loss's
    gradient program, which lacks the optimizer update)."""
    bf16_loss = functools.partial(gpt.loss, dtype=jnp.bfloat16)
    policies = jax.checkpoint_policies

    def pre_ad_budget():
        return int(budget * measured["fp32"]) if "fp32" in measured else budget
    return {
        "fp32": lambda: make_train_step(gpt.loss, opt),
        f"fp32+graphopt-remat{budget:.0%}": lambda: graphopt.optimize(
            make_train_step(gpt.loss, opt), memory_budget=budget, **remat_options),
        "fp32+nothing_saveable": lambda: make_train_step(functools.partial(
            gpt.loss, block_remat=policies.nothing_saveable), opt),
        f"fp32+graphopt.remat(loss){budget:.0%}": lambda: _pre_ad_step(
            graphopt.remat(gpt.loss, memory_budget=pre_ad_budget(), solver=pre_solver), opt),
        f"fp32+graphopt-remat{budget:.0%}-keep": lambda: graphopt.optimize(
            make_train_step(gpt.loss, opt), memory_budget=budget, remat_micro_batches=False,
            **remat_options),
        "fp32+dots_no_batch_saveable": lambda: make_train_step(functools.partial(
            gpt.loss, block_remat=policies.dots_with_no_batch_dims_saveable), opt),
        "bf16": lambda: make_train_step(bf16_loss, opt),
        "bf16+graphopt": lambda: make_train_step(graphopt.optimize(bf16_loss), opt),
        "bf16+graphopt-attention": lambda: make_train_step(
            graphopt.optimize(bf16_loss, passes=["prune", "fuse_attention"]), opt),
        "bf16+hand-attention": lambda: make_train_step(
            functools.partial(_loss_with_hand_attention, dtype=jnp.bfloat16), opt),
    }


def _pre_ad_step(rematted, opt):
    step = make_train_step(rematted, opt)
    step.rematted = rematted  # for the row's notes
    return step


def _graphopt_notes(step, args, prefix="remat:"):
    """The remat pass's notes for these arguments (its solver, measured bytes)."""
    if isinstance(step, graphopt.Optimized):
        return [n for n in step.report(*args).notes() if n.startswith(prefix)]
    if hasattr(step, "rematted"):  # pre-AD: what the solver chose for the loss
        info = step.rematted.info(args[0], args[2])
        return [n for n in info["stats"].notes if n.startswith(prefix)] + [
            f"remat: pre-AD {info.get('solver')}: {analysis.fmt_bytes(info['bytes'])} of the "
            f"loss gradient, recomputes {analysis.fmt_flops(info['flops'])}"]
    return []


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    ap.add_argument("--only", nargs="*", default=None, help="subset of variant names")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget", type=float, default=0.25, help="remat budget, a fraction")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after which no further variant starts")
    ap.add_argument("--remat-variants", choices=["auto", "fixed", "adaptive"], default="auto",
                    help=f"auto: the pass measures every fence variant; fixed: {FIXED_REMAT} "
                         "(one floor compile instead of 8); adaptive: fixed when the first "
                         "row's compile took over 8 s")
    ap.add_argument("--pre-solver", default="auto", choices=["auto", "greedy", "milp"],
                    help="solver of the pre-AD row (auto: milp where the graph is small)")
    ns = ap.parse_args(argv)
    start = time.perf_counter()
    sizes = TINY_SIZES if ns.tiny else REFERENCE_SIZES
    params = gpt.init(jax.random.PRNGKey(0), **sizes)
    batch = gpt.example_batch(jax.random.PRNGKey(1), **sizes)
    opt = gpt.optimizer()
    state = opt.init(params)
    args = (params, state, batch)
    device = jax.devices()[0]
    print(f"GPT step {sizes} on {device.platform} ({getattr(device, 'device_kind', '')}), "
          f"JAX {jax.__version__}", flush=True)
    rows = []
    remat_options = dict(FIXED_REMAT) if ns.remat_variants == "fixed" else {}
    measured: dict = {}
    for name, make in variants(opt, ns.budget, remat_options, measured, ns.pre_solver).items():
        if ns.only and name not in ns.only:
            continue
        if ns.deadline is not None and time.perf_counter() - start > ns.deadline:
            print(f"{name:<26} skipped: past the {ns.deadline:.0f} s deadline", flush=True)
            continue
        step = make()
        fn = jax.jit(step)
        try:
            t0 = time.perf_counter()
            temp = analysis.xla_memory(fn, *args)["temp_bytes"]  # traces, runs graphopt, compiles
            build_s = time.perf_counter() - t0
            t = median_time(fn, *args, repeats=ns.repeats)
            loss = float(fn(*args)[2])
        except Exception as exc:  # one variant failing (e.g. an infeasible budget) should not stop the table
            print(f"{name:<26} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
            continue
        rows.append((name, t, temp, loss))
        measured[name] = temp
        if ns.remat_variants == "adaptive" and len(rows) == 1 and build_s > 8:
            remat_options.update(FIXED_REMAT)  # the thunks read it when built
            print(f"(compiles take {build_s:.0f} s: remat with {FIXED_REMAT})", flush=True)
        print(f"{name:<26} {t * 1e3:9.2f} ms  {analysis.fmt_bytes(temp):>11}  loss {loss:.5f}"
              f"  (trace+optimize+compile {build_s:.1f} s)", flush=True)
        for note in _graphopt_notes(step, args):
            print(f"    {note}", flush=True)
    if rows:
        base_t, base_m = rows[0][1], rows[0][2]
        print(f"\nagainst {rows[0][0]}:")
        for name, t, m, _ in rows:
            print(f"  {name:<26} speed {base_t / t:5.2f}x   temp memory {m / max(base_m, 1):5.2f}x")
    print(f"total {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
