"""Fusion benchmarks: baseline vs graphopt's fusion vs the same rewrite done by hand.

1. CNN inference (two 3x3 conv layers of 32 and 64 channels, batch 16 of 32x32x3) with
   batch norm folded: median time per call, ratio to baseline.
2. GPT loss gradient (batch 8, sequence 512, width 256, 2 layers, vocabulary 32768):
   XLA temp memory with the cross-entropy fused into vocabulary chunks.
3. GPT loss + gradient (T=256) with the attention fusion on CPU: median time of the
   default pipeline and of the fusion alone (causal attention becomes the block-causal
   kernel there), against dot_product_attention and the block-causal kernel by hand.
4. The GPT training step (value_and_grad + Adam, sizes of 2.) with the decorator on the
   step: XLA temp memory of ``graphopt.optimize(step)`` (the loss fused before AD) against
   ``jax.jit(step)``, and the largest difference in the updated parameters.

Memory-aware CPU scheduler: XLA_FLAGS is set below, before JAX starts. Times are
medians after warm-up over blocks of consecutive calls, the variants taking turns.

    python bench/fusion_bench.py [--quick]
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

import graphopt
from graphopt import analysis, progress
from graphopt.models import cnn, gpt
from graphopt.transforms.fuse_attention import block_causal_attention, n_causal_blocks
from graphopt.transforms.fuse_xent import chunked_cross_entropy

QUICK = "--quick" in sys.argv
MiB = 2**20


def timed(fns: dict, args, reps: int, block: int = 10) -> dict:
    """Median seconds per call of each function: blocks of ``block`` consecutive calls,
    the functions taking turns (rotated each round) so load drifts hit all alike; a call
    right after another program's pays for its cache misses, so calls are not mixed."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times = {k: [] for k in fns}
    names = list(fns)
    for r in progress.track(range(max(1, reps // block)), "timing"):
        for k in names[r % len(names):] + names[:r % len(names)]:
            jax.block_until_ready(fns[k](*args))  # warm this program's buffers again
            for _ in range(block):
                t0 = time.perf_counter()
                jax.block_until_ready(fns[k](*args))
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(title, rows, unit):
    print(f"\n{title}")
    base = rows[0][1]
    for name, v in rows:
        ratio = base / v if unit == "ms" else v / base
        label = "speed-up" if unit == "ms" else "of baseline"
        shown = v * 1e3 if unit == "ms" else v / MiB
        print(f"  {name:<34} {shown:10.2f} {unit if unit == 'ms' else 'MiB'}   "
              f"{ratio:6.2f}x {label}")


# ------------------------------------------------------------------- 1. conv + BN

def fold_by_hand(params, x):
    """cnn.apply in inference with each batch norm folded into its conv by hand."""
    for i in range(sum(k.startswith("conv") for k in params)):
        bn = params[f"bn{i}"]
        a = bn["scale"] * lax.rsqrt(bn["var"] + cnn.BN_EPS)
        w = params[f"conv{i}"]["w"] * a
        y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(y + (bn["bias"] - bn["mean"] * a))
    x = jnp.mean(x, axis=(1, 2))
    return x @ params["head"]["w"] + params["head"]["b"]


def bench_batchnorm():
    k = jax.random.PRNGKey(0)
    s = cnn.BENCH_SIZES
    p = cnn.init(k, **s)
    p = {n: ({kk: v + 0.1 * jax.random.uniform(k, v.shape) for kk, v in d.items()}
             if n.startswith("bn") else d) for n, d in p.items()}
    x, _ = cnn.example_batch(k, **s)
    fused = graphopt.optimize(cnn.apply, passes=["fuse_batchnorm"])
    fns = {"baseline (jax.jit)": jax.jit(cnn.apply), "graphopt fuse_batchnorm": fused,
           "folded by hand": jax.jit(fold_by_hand)}
    t = timed(fns, (p, x), 20 if QUICK else 100)
    hits = fused.report(p, x).hits()
    table(f"1. CNN inference, batch norm folded (hits: {dict(hits)})", list(t.items()), "ms")
    return t


# --------------------------------------------------------------- 2. cross entropy

def hidden_by_hand(params, tokens):
    """gpt.apply up to the final layer norm (what a user writes to chunk the loss by hand)."""
    _, t = tokens.shape
    x = params["wte"][tokens] + params["wpe"][:t]
    for i, blk in enumerate(gpt.unstack_blocks(params)["blocks"]):
        with jax.named_scope(f"block{i}"):
            x = gpt._block(blk, x, jnp.float32)
    return gpt.layernorm(params["ln_f"], x)


def loss_by_hand(params, batch, chunk):
    inputs, targets = batch
    return chunked_cross_entropy(hidden_by_hand(params, inputs), params["w_out"], targets, chunk=chunk)


def big_vocab_gpt():
    """(params, batch) of the GPT of sections 2 and 4: vocabulary 32768, 8 x 512 tokens."""
    k = jax.random.PRNGKey(0)
    s = dict(n_layers=2, d_model=256, n_heads=4, seq_len=512, vocab=32768, batch=8)
    if QUICK:
        s.update(seq_len=128, vocab=8192)
    return gpt.init(k, **s), gpt.example_batch(k, **{n: s[n] for n in ("batch", "seq_len", "vocab")})


def bench_cross_entropy():
    p, batch = big_vocab_gpt()
    fused_loss = graphopt.optimize(gpt.loss, passes=["fuse_cross_entropy"])
    chunk = 1024  # what the cost model picks for 4096 tokens (16 MiB float32 chunks)
    grads = {"baseline jax.grad(loss)": jax.grad(gpt.loss),
             "graphopt fuse_cross_entropy": jax.grad(fused_loss),
             "chunked by hand": jax.grad(functools.partial(loss_by_hand, chunk=chunk))}
    rows = [(n, analysis.xla_memory(g, p, batch)["temp_bytes"]) for n, g in grads.items()]
    hits = fused_loss.report(p, batch).hits()
    table(f"2. GPT loss gradient, XLA temp memory (memory-aware scheduler: "
          f"{analysis.memory_aware_scheduler_active()}; hits: {dict(hits)})", rows, "MiB")
    return rows


# -------------------------------------------------------------------- 3. attention

def attention_by_hand(q, k, v, causal=True):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def block_causal_by_hand(q, k, v, causal=True):
    return block_causal_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                  n_blocks=n_causal_blocks(q.shape[1], k.shape[1]))


def with_attention(att, p, batch):
    """value_and_grad of the GPT loss with ``att`` in place of its attention (traced now)."""
    orig = gpt.attention
    try:
        gpt.attention = att
        f = jax.jit(jax.value_and_grad(gpt.loss))
        f(p, batch)
    finally:
        gpt.attention = orig
    return f


def bench_attention():
    k = jax.random.PRNGKey(0)
    s = dict(n_layers=2, d_model=128, n_heads=4, seq_len=256, vocab=512, batch=4)
    p = gpt.init(k, **s)
    batch = gpt.example_batch(k, **{n: s[n] for n in ("batch", "seq_len", "vocab")})
    fused = graphopt.optimize(gpt.loss, passes=["fuse_attention"])
    default = graphopt.optimize(gpt.loss)
    fns = {"baseline value_and_grad(loss)": jax.jit(jax.value_and_grad(gpt.loss)),
           "graphopt default pipeline": jax.jit(jax.value_and_grad(default)),
           "graphopt fuse_attention alone": jax.jit(jax.value_and_grad(fused)),
           "dot_product_attention by hand": with_attention(attention_by_hand, p, batch),
           "block-causal kernel by hand": with_attention(block_causal_by_hand, p, batch)}
    t = timed(fns, (p, batch), 10 if QUICK else 40)
    hits = fused.report(p, batch).hits()
    table(f"3. GPT loss + gradient on CPU, attention fused (hits: {dict(hits)})", list(t.items()), "ms")
    return t


# ------------------------------------------------------------ 4. the whole step

def bench_train_step():
    p, batch = big_vocab_gpt()
    args = (p, gpt.init_opt_state(p), batch)
    step = graphopt.optimize(gpt.train_step)
    rows = [("baseline jax.jit(step)", analysis.xla_memory(gpt.train_step, *args)["temp_bytes"]),
            ("graphopt.optimize(step)", analysis.xla_memory(step, *args)["temp_bytes"])]
    first = step.report(*args).records[0]
    hits = dict(first.stats.hits) if first.name == "fuse_before_ad" else {}
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(jax.jit(gpt.train_step)(*args)), jax.tree.leaves(step(*args))))
    table(f"4. GPT training step, decorator on the step, XLA temp memory (fused before AD: "
          f"{hits}; largest difference in the outputs {err:.1e})", rows, "MiB")
    return rows


if __name__ == "__main__":
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, quick={QUICK}")
    bench_batchnorm()
    bench_cross_entropy()
    bench_attention()
    bench_train_step()
