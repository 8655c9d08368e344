"""Structural pruning on scikit-learn's digits (CPU, one run): accuracy and latency.

For an MLP, a wider MLP and the zoo CNN: train with optax, prune 50% of the channels of
every prunable group (``graphopt.transforms.structural.prune_channels``, l2 criterion),
fine-tune with the sliced optax state, then print baseline vs pruned side by side:
test accuracy, params, FLOPs and the median latency of the jitted model on a batch of 1024.
Also checks that removing dead channels alone leaves outputs unchanged.

    .venv/bin/python bench/pruning_bench.py [--quick]
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from graphopt.models import cnn, mlp
from graphopt.transforms.structural import prune_channels


def data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y.astype(np.int32), test_size=0.3, random_state=0, stratify=y)


def train(loss, params, xs, ys, steps, lr, key, opt_state=None, batch=128):
    opt = optax.adam(lr)
    opt_state = opt.init(params) if opt_state is None else opt_state

    @jax.jit
    def step(params, opt_state, xb, yb):
        g = jax.grad(loss)(params, (xb, yb))
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(steps):
        idx = jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, len(xs))
        params, opt_state = step(params, opt_state, xs[idx], ys[idx])
    return params, opt_state


def accuracy(apply, params, x, y):
    return float(jnp.mean(jnp.argmax(jax.jit(apply)(params, x), -1) == y)) * 100


def run(name, apply, loss, params, finalize, xs, ys, xt, yt, steps, lr):
    key = jax.random.key(1)
    params, opt_state = train(loss, params, xs, ys, steps, lr, key)
    params = finalize(params)
    acc0 = accuracy(apply, params, xt, yt)
    plan = prune_channels(apply, params, xs[:256], sparsity=0.5, criterion="l2")
    small, small_state = plan.apply(params), plan.apply(opt_state)
    acc_pruned = accuracy(plan.function, small, xt, yt)
    small, _ = train(loss, small, xs, ys, steps // 2, lr, jax.random.key(2), opt_state=small_state)
    small = finalize(small)
    acc1 = accuracy(plan.function, small, xt, yt)
    xb = jnp.asarray(np.resize(xt, (1024,) + xt.shape[1:]))
    t = plan.measure(params, xb, repeats=200)
    p0, p1 = plan.param_counts()
    print(f"\n{name}\n{plan}")
    print(f"  {'':22s}{'baseline':>12s}{'pruned':>12s}{'ratio':>8s}")
    print(f"  {'test accuracy %':22s}{acc0:12.2f}{acc1:12.2f}{acc1 - acc0:+8.2f}  (before fine-tune {acc_pruned:.2f})")
    print(f"  {'params':22s}{p0:12,d}{p1:12,d}{p0 / p1:8.2f}x")
    print(f"  {'FLOPs':22s}{plan.flops[0]:12,.0f}{plan.flops[1]:12,.0f}{plan.flops[0] / plan.flops[1]:8.2f}x")
    print(f"  {'latency ms (b=1024)':22s}{t['before'] * 1e3:12.3f}{t['after'] * 1e3:12.3f}{t['speedup']:8.2f}x")
    return {"name": name, "acc": (acc0, acc1), "speedup": t["speedup"]}


def exact_check(xs):
    params = mlp.init(jax.random.key(0), sizes=(64, 64, 64, 10))
    params["layers"][0]["w"] = params["layers"][0]["w"].at[:, :16].set(0.0)
    params["layers"][2]["w"] = params["layers"][2]["w"].at[:8].set(0.0)
    plan = prune_channels(mlp.apply, params, xs[:256], sparsity=0.0)
    out, small = mlp.apply(params, xs), plan.function(plan.apply(params), xs)
    err = float(jnp.max(jnp.abs(out - small)))
    print(f"exact (dead channels only): channels {plan.channels()[0]} -> {plan.channels()[1]}, "
          f"max |diff| = {err:.2e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer training steps (smoke run)")
    args = ap.parse_args()
    steps = 300 if args.quick else 3000
    xs, xt, ys, yt = (jnp.asarray(a) for a in data())
    exact_check(xs)
    results = []
    for name, sizes in (("MLP 64-256-256-10", (64, 256, 256, 10)), ("wide MLP 64-1024-1024-10", (64, 1024, 1024, 10))):
        results.append(run(name, mlp.apply, mlp.loss, mlp.init(jax.random.key(0), sizes=sizes),
                           lambda p: p, xs, ys, xt, yt, steps, 1e-3))
    xs_img, xt_img = xs.reshape(-1, 8, 8, 1), xt.reshape(-1, 8, 8, 1)

    def finalize_cnn(p):  # running BN statistics from the training set (momentum 0 = copy)
        return cnn.update_batch_stats(p, xs_img, momentum=0.0)

    results.append(run("zoo CNN (32, 64) channels", cnn.apply, cnn.loss,
                       cnn.init(jax.random.key(0), in_channels=1, channels=(32, 64), classes=10),
                       finalize_cnn, xs_img, ys, xt_img, yt, steps // 2, 3e-3))
    print("\nsummary (target: accuracy within 1 point, >= 1.7x faster)")
    for r in results:
        ok = abs(r["acc"][1] - r["acc"][0]) <= 1.0 or r["acc"][1] > r["acc"][0]
        print(f"  {r['name']:28s} acc {r['acc'][0]:.2f} -> {r['acc'][1]:.2f} {'ok' if ok else 'MISS'}; "
              f"{r['speedup']:.2f}x {'ok' if r['speedup'] >= 1.7 else 'MISS'}")


if __name__ == "__main__":
    main()
