"""The zoo GPT training step on 8 host CPU devices, through graphopt.optimize.

Run by tests/test_sharding.py in a process of its own (JAX must be asked for 8 CPU devices
before it starts). Each check asserts and prints one line; the last line is a JSON dict
of the figures for the test to read. ``python tests/sharded_steps.py`` runs it by hand.
"""
import os
import sys

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8",
                                    "--xla_cpu_enable_concurrency_optimized_scheduler=false"])
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import graphopt  # noqa: E402
from graphopt.errors import BudgetError  # noqa: E402
from graphopt.models import gpt  # noqa: E402

# one least-memory variant measured, not eight (compile time): the one GPT steps pick
REMAT = dict(remat_solver="greedy", remat_order_backward=True, remat_narrow_fence=True,
             remat_skip_kept=True, remat_refine_max=1)
FIG: dict = {}
T0 = time.perf_counter()


def say(what):
    print(f"[{time.perf_counter() - T0:6.1f} s] {what}", flush=True)


def mesh(shape, names):  # Auto: JAX's default Explicit axes make the embedding gather fail
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def run(step, params, state, batch, n=2):
    losses = []
    for _ in range(n):
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    return losses, params


def close(a, b, rtol, atol, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what)


def tp_spec(path, leaf):
    """Megatron-style tensor parallelism: heads and the MLP's hidden units over "model"."""
    name = jax.tree_util.keystr(path)
    if any(k in name for k in ("'wq'", "'wk'", "'wv'")):
        return P(None, "model", None)           # [d, H, Dh]: heads split
    if "'wo'" in name:
        return P("model", None, None)           # [H, Dh, d]
    if "'w_fc'" in name:
        return P(None, "model")                 # [d, 4d]: columns
    if "'b_fc'" in name:
        return P("model")
    if "'w_proj'" in name:
        return P("model", None)                 # [4d, d]: rows
    return P()


def main():
    key = jax.random.PRNGKey(0)
    params = gpt.init(key, n_layers=1, d_model=32, n_heads=4, seq_len=32, vocab=64)
    opt = gpt.optimizer()
    state = opt.init(params)
    batch = gpt.example_batch(jax.random.PRNGKey(1), batch=32, seq_len=32, vocab=64)
    step = gpt.make_train_step(opt)
    ref_losses, ref_params = run(jax.jit(step), params, state, batch)
    say(f"one device, jax.jit: losses {ref_losses}")

    # 1. data parallel over 8 devices, remat under a per-device budget
    m = mesh((8,), ("data",))
    rep, dp = NamedSharding(m, P()), NamedSharding(m, P("data"))
    args = (jax.device_put(params, rep), jax.device_put(state, rep), jax.device_put(batch, dp))
    base = jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes
    ostep = graphopt.optimize(step, memory_budget=0.6, **REMAT)
    losses, new = run(ostep, *args)
    close(losses, ref_losses, 1e-5, 1e-6, "data-parallel losses")
    close(new, ref_params, 1e-5, 1e-6, "data-parallel parameters")
    assert jax.tree.leaves(new)[0].sharding.is_equivalent_to(rep, 2), jax.tree.leaves(new)[0].sharding
    report = ostep.report(*args)
    notes = [n for n in report.notes() if n.startswith("remat")]
    assert any("per device" in n for n in notes), notes
    temp = ostep.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < base, (temp, base)  # below the unoptimized step's, per device
    FIG.update(dp_temp_per_device=int(temp), dp_base_temp_per_device=int(base))
    say(f"data parallel x8 + remat (0.6 per device): losses equal; temp per device "
        f"{base} -> {temp} bytes")

    # under the user's own jax.jit with NamedSharding in/out shardings, same numbers
    jstep = jax.jit(graphopt.optimize(step), in_shardings=(rep, rep, dp),
                    out_shardings=(rep, rep, rep))
    losses, new = run(jstep, params, state, batch)
    close(losses, ref_losses, 1e-5, 1e-6, "jax.jit(in_shardings=...) losses")
    close(new, ref_params, 1e-5, 1e-6, "jax.jit(in_shardings=...) parameters")
    say("jax.jit(graphopt.optimize(step), in_shardings=, out_shardings=): equal")

    # 2. a budget below one device's floor: a clear error naming the devices
    try:
        graphopt.optimize(step, memory_budget=64, **REMAT)(*args)
    except BudgetError as e:
        assert "per device" in str(e) and "smallest feasible budget" in str(e), e
        FIG["floor_per_device"] = e.floor_bytes
        say(f"budget below the floor: {str(e)[:120]}...")
    else:
        raise AssertionError("a 64-byte budget per device was accepted")
    try:  # micro-batches would slice a sharded batch across devices: refused by name
        graphopt.optimize(step, memory_budget=0.6, remat_micro_batches=2, **REMAT)(*args)
    except ValueError as e:
        assert "remat_micro_batches" in str(e) and "8 devices" in str(e), e
    else:
        raise AssertionError("micro-batches of a sharded batch were accepted")
    try:  # a mesh axis that does not divide the batch: JAX's own error, before tracing
        jstep(params, state, jax.tree.map(lambda x: x[:12], batch))
    except ValueError as e:
        assert "evenly divide" in str(e) or "divisible" in str(e), e
        say(f"batch of 12 over 8 devices: {type(e).__name__}: {str(e)[:90]}...")
    else:
        raise AssertionError("a batch of 12 split 8 ways was accepted")

    # shard_map: graphopt around it (the per-device body kept), or inside its body
    def dp_grads(p, b):  # jax.grad of a replicated input already sums over "data"
        return jax.lax.pmean(jax.grad(gpt.loss)(p, b), "data")

    def inner_grads(p, b):  # traced per device: values varying along "data" stay so
        return jax.lax.pmean(jax.grad(graphopt.optimize(gpt.loss))(p, b), "data")

    specs = dict(mesh=m, in_specs=(P(), P("data")), out_specs=P())
    want = jax.jit(jax.shard_map(dp_grads, **specs))(params, batch)
    close(graphopt.optimize(jax.shard_map(dp_grads, **specs))(params, batch), want, 1e-5, 1e-6,
          "graphopt.optimize(jax.shard_map(...)) gradients")
    close(jax.jit(jax.shard_map(inner_grads, **specs))(params, batch), want, 1e-5, 1e-6,
          "graphopt.optimize inside jax.shard_map")
    got = jax.jit(jax.shard_map(inner_grads, check_vma=False, **specs))(params, batch)
    close(got, jax.jit(jax.grad(gpt.loss))(params, batch), 1e-5, 1e-6,
          "inside shard_map(check_vma=False)")
    say("shard_map: graphopt around it and inside it (check_vma True and False) equal")

    # 3. tensor parallel (4 data x 2 model), bfloat16 matmuls and remat, against one device
    m2 = mesh((4, 2), ("data", "model"))
    pspec = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(m2, tp_spec(p, x)), params)
    tparams = jax.device_put(params, pspec)
    tstate = jax.jit(opt.init)(tparams)  # the optimizer state follows the parameters
    tbatch = jax.device_put(batch, NamedSharding(m2, P("data")))
    low = dict(precision="bfloat16")
    one_losses, one_params = run(graphopt.optimize(step, **low), params, state, batch)
    tstep = graphopt.optimize(step, memory_budget=0.8, **low, **REMAT)  # remat per device too
    tp_losses, tp_params = run(tstep, tparams, tstate, tbatch)
    rec = next(r for r in tstep.report(tparams, tstate, tbatch).records if r.name == "remat")
    assert rec.changed and any("per device" in n for n in rec.stats.notes), rec.stats.notes
    close(tp_losses, one_losses, 1e-3, 1e-4, "tensor-parallel bfloat16 losses")
    # Adam moves a weight by ~lr per step whatever its gradient's size, so bfloat16 rounding
    # in another reduction order may flip a near-zero gradient's step: up to 2 x lr apart
    close(tp_params, one_params, 0, 3e-3, "tensor-parallel bfloat16 parameters")
    close(tp_losses, ref_losses, 2e-2, 0, "bfloat16 losses near float32's")
    wq = tp_params["blocks"][0]["attn"]["wq"]
    assert wq.sharding.is_equivalent_to(pspec["blocks"][0]["attn"]["wq"], wq.ndim), wq.sharding
    say(f"tensor parallel 4x2 + bfloat16 + remat (0.8 per device): losses {tp_losses} "
        f"(one device {one_losses})")

    # 4. per-device temp memory as the data-parallel mesh grows
    temps, ostep = [], graphopt.optimize(step)  # one program: jax.jit places it per mesh
    for n in (1, 2, 4, 8):
        mn = mesh((n,), ("data",))
        a = (jax.device_put(params, NamedSharding(mn, P())),
             jax.device_put(state, NamedSharding(mn, P())),
             jax.device_put(batch, NamedSharding(mn, P("data"))))
        temps.append(int(ostep.lower(*a).compile()
                         .memory_analysis().temp_size_in_bytes))
    assert all(b < a for a, b in zip(temps, temps[1:])), temps
    FIG["temp_per_device_1_2_4_8"] = temps
    say(f"per-device temp, meshes of 1/2/4/8: {temps}")
    print(json.dumps(FIG))


if __name__ == "__main__":
    sys.exit(main())
