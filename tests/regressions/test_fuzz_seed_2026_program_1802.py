"""graphopt.fuzz regression (seed 2026 program 1802): mismatch in jvp.

jvp[3]: float32: max |a-b| 1.24 > 1e-06 + 1e-05 * 1.24

Fixed (graphopt's): a user's custom_jvp (half the true derivative) on the batch, summed into an aux
output, post-AD remat at the floor: micro-batching inlined the custom_jvp
calls to stream their bodies. Values and the step's own gradients were unchanged, but a
derivative taken of the optimized step (the oracle's jvp) used the bodies' derivatives
instead of the custom rules. A remat result that opened custom_jvp calls is now one
custom_jvp: the rewritten program forward, the original's JVP as its rule
(transforms/remat/pass_.py, keep_derivatives).
"""
import jax
import jax.numpy as jnp
import optax

from graphopt.fuzz import regression
from graphopt.fuzz_programs import custom_jvp


OPT = optax.sgd(0.05, momentum=0.9)

def loss_fn(params, batch):
    w1, = params["w1"],
    d0, = batch["d0"],
    def f5(a3):
        return (a3, a3)
    v5, v6, = custom_jvp(f5)(d0)
    v9 = jnp.min(w1, axis=0).mean()
    v10 = jnp.mean(w1 ** 2)
    v12 = jnp.sum(v5, axis=0)
    return v9, (v12, v10)

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w1', (2, 3), 'float32', 'param', None),
    ('d0', (3, 2, 2), 'float32', 'batch', None),
]
CONFIG = {'options': {'memory_budget': 0.19, 'remat_measure': 'estimate'}, 'jit': False, 'passes': ['cse'], 'optimizer': 'optax.sgd(0.05, momentum=0.9)', 'ad': ('jvp',)}


def test_fuzz_seed_2026_program_1802():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
