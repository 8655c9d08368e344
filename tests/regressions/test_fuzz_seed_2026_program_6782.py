"""graphopt.fuzz regression (seed 2026 program 6782): mismatch in jvp.

jvp[0]: float32: max |a-b| 1.15 > 1e-06 + 1e-05 * 2.08

Fixed (graphopt's): a user's custom_jvp on the batch feeding two dots, remat at 0.97 (micro-batches
chosen): inlined the custom_jvp
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


OPT = optax.sgd(0.1)

def loss_fn(params, batch):
    w11, w12, = params["w11"], params["w12"],
    d0, d3, = batch["d0"], batch["d3"],
    def f9(a5, a6):
        return (a5, a5)
    v9, v10, = custom_jvp(f9)(d0, d3)
    v13 = (v10 @ w11) * (v10 @ w12).sum()
    v18 = jnp.mean(v13 ** 2)
    return v18, (d0,)

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w11', (4, 4), 'float32', 'param', None),
    ('w12', (4, 3), 'float32', 'param', None),
    ('d0', (2, 2, 4, 4), 'float32', 'batch', None),
    ('d3', (2,), 'float32', 'batch', None),
]
CONFIG = {'options': {'memory_budget': 0.97, 'remat_measure': 'estimate', 'remat_solver': 'greedy'}, 'jit': False, 'passes': ['fuse_attention_auto'], 'optimizer': 'optax.sgd(0.1)', 'ad': ('jvp',)}


def test_fuzz_seed_2026_program_6782():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
