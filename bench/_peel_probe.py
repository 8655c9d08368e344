import sys, time, jax
sys.path.insert(0, "bench")
from gpt_step_bench import DESIGN_SIZES, TINY_SIZES
import graphopt
from graphopt import analysis
from graphopt.__main__ import median_time
from graphopt.models import gpt
from graphopt.models._common import make_train_step
from graphopt.transforms import remat_batch
sizes = TINY_SIZES if "--tiny" in sys.argv else DESIGN_SIZES
if "--tiny" in sys.argv:
    sizes = dict(sizes, batch=8)
reps = 40
params = gpt.init(jax.random.PRNGKey(0), **sizes)
batch = gpt.example_batch(jax.random.PRNGKey(1), **sizes)
opt = gpt.optimizer(); state = opt.init(params); args = (params, state, batch)
print(jax.devices()[0].device_kind, jax.__version__, sizes, flush=True)
rows = []
for name, peel in [("fp32", None), ("micro4-peeled", True), ("micro4-plain", False), ("fp32-again", None)]:
    t0 = time.perf_counter()
    if peel is None:
        fn = jax.jit(make_train_step(gpt.loss, opt))
    else:
        remat_batch.PEEL = peel
        fn = jax.jit(graphopt.optimize(make_train_step(gpt.loss, opt), memory_budget=0.25,
                                       remat_micro_batches=4))
    temp = analysis.xla_memory(fn, *args)["temp_bytes"]
    b = time.perf_counter() - t0
    t = median_time(fn, *args, repeats=reps)
    loss = float(fn(*args)[2])
    rows.append((name, t))
    print(f"{name:<16} {t*1e3:8.2f} ms {analysis.fmt_bytes(temp):>10} loss {loss:.5f} build {b:.0f}s "
          f"vs fp32 {t/rows[0][1]-1:+.1%}", flush=True)
