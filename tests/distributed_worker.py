"""One process of the multi-process test (tests/test_distributed.py starts two of these).

    python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT INPUTS.npz OUT.npz [STEPS]

Joins ``jax.distributed`` on 127.0.0.1:PORT, builds a data-parallel mesh over every
process's devices, runs ``graphopt.optimize`` of the zoo GPT training step (default sizes)
on global arrays (parameters and Adam state replicated, the batch split over "data", each
process contributing its own rows) and writes the losses, the final parameters (gathered)
and what graphopt's report says to OUT.npz. INPUTS.npz holds the starting values as flat
leaves (``param{i}``, ``opt{i}``, ``inputs``, ``targets``): the test writes them, so the
workers spend no time on initialization and start from exactly the reference's values.
Not a pytest module (its name does not match test_*.py).

Exit status 77: this JAX cannot run CPU collectives across processes (the test skips).
"""
import sys

import numpy as np

import jax

NO_COLLECTIVES = 77  # the test skips on this status, and fails on any other non-zero one


def set_cpu_collectives():
    """Cross-process CPU collectives need an implementation (gloo); without one the
    computation fails at its first all-reduce, so refuse up front."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError) as exc:
        print(f"distributed_worker: JAX {jax.__version__} offers no gloo CPU collectives "
              f"(jax_cpu_collectives_implementation): {exc}", file=sys.stderr)
        sys.exit(NO_COLLECTIVES)


def global_inputs(mesh, n_proc, pid, path, opt):
    """Params and Adam state replicated, the batch split over "data": this process's rows only."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from graphopt.models import gpt

    data = np.load(path)
    # the trees' structure from abstract evaluation: tracing only, nothing computed
    shapes = jax.eval_shape(gpt.init, jax.ShapeDtypeStruct((2,), np.uint32))
    p_tree = jax.tree.structure(shapes)
    o_tree = jax.tree.structure(jax.eval_shape(opt.init, shapes))
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("data"))

    def replicate(prefix, treedef):
        return treedef.unflatten(
            jax.make_array_from_process_local_data(replicated, data[f"{prefix}{i}"])
            for i in range(treedef.num_leaves))

    def split(x):  # the global shape is inferred: each process holds its batch / n_proc rows
        per = x.shape[0] // n_proc
        return jax.make_array_from_process_local_data(rows, x[pid * per:(pid + 1) * per])

    return (replicate("param", p_tree), replicate("opt", o_tree),
            (split(data["inputs"]), split(data["targets"])))


def main(argv):
    if len(argv) not in (5, 6):
        sys.exit(__doc__)
    pid, n_proc, port, inputs, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    steps = int(argv[5]) if len(argv) == 6 else 3
    set_cpu_collectives()
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=n_proc, process_id=pid)
    from jax.experimental import multihost_utils
    import graphopt
    from graphopt.models import gpt

    # Auto axes: under JAX's default Explicit mode even plain jax.jit of the GPT fails on
    # the embedding gather of a sharded batch.
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    opt = gpt.optimizer()
    params, opt_state, batch = global_inputs(mesh, n_proc, pid, inputs, opt)
    step = graphopt.optimize(gpt.make_train_step(opt))
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
    report = step.report(params, opt_state, batch)  # the cached entry: built by the first step
    # tiled=True: a global array comes back whole (its global value), whatever its sharding
    losses, params = multihost_utils.process_allgather((losses, params), tiled=True)
    changed = [r.name for r in report.records if r.changed]
    leaves = jax.tree.leaves(params)
    np.savez(out, losses=np.stack(losses), n_params=len(leaves),
             process_count=jax.process_count(), device_count=jax.device_count(),
             local_device_count=jax.local_device_count(),
             eqns_before=report.eqns_before, eqns_after=report.eqns_after,
             changed=np.array(changed, dtype=str),
             **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
