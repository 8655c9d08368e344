"""graphopt.fuzz regression (seed 16 program 85): mismatch in outputs.

Found against the working tree after the remat comparison fix: a max over a scan's stacked
``log`` of negative values (NaN). ``jax.jit`` of the original gives no NaN in the update, while
JAX's own definition (op by op) gives NaN in 14 gradient elements, as the optimized program
does: XLA fused the original's gradient mask ``eq(x, max x)`` into consumers that disagree
on the NaN. The oracle now accepts a value equal to the original evaluated op by op.

outputs[0]: NaN in different places (0 vs 4)
"""
import jax
import jax.numpy as jnp
import optax
from jax import lax

from graphopt.fuzz import regression


OPT = optax.sgd(0.05, momentum=0.9)

def loss_fn(params, batch):
    w1, w2, = params["w1"], params["w2"],
    d0, = batch["d0"],
    v3 = (d0 @ w1) @ w2
    def f16(carry, a6):
        a4, a5, = carry
        v15 = jnp.log(v3)
        return (a4, v15), (v15, a5)
    (v16, v17), (v18, v19) = lax.scan(f16, (d0, v3), d0, reverse=False)
    v32 = jnp.max(v18, axis=0).sum()
    v36 = jnp.sum(v3, axis=0)
    return v32, (v36,)

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w1', (2, 2), 'float32', 'param', None),
    ('w2', (2, 5), 'float32', 'param', None),
    ('d0', (4, 2), 'float32', 'batch', None),
]
CONFIG = {'options': {'xent_chunk': 2, 'chain_ratio': 1.0, 'memory_budget': 0.33, 'remat_micro_batches': False, 'remat_measure': 'estimate', 'remat_solver': 'greedy', 'remat_narrow_fence': True}, 'jit': False, 'passes': ['cse'], 'optimizer': 'optax.sgd(0.05, momentum=0.9)', 'ad': ()}


def test_fuzz_seed_16_program_85():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
