"""graphopt.fuzz regression (seed 2026 program 1914): mismatch in jvp.

jvp[5]: float32: max |a-b| 0.0781 > 1e-06 + 1e-05 * 11.5

Fixed (graphopt's): bfloat16 cross-entropy (jax.nn.log_softmax is a custom_jvp) and batch
statistics, micro-batches=3: inlined the custom_jvp
calls to stream their bodies. Values and the step's own gradients were unchanged, but a
derivative taken of the optimized step (the oracle's jvp) used the bodies' derivatives
instead of the custom rules. A remat result that opened custom_jvp calls is now one
custom_jvp: the rewritten program forward, the original's JVP as its rule
(transforms/remat/pass_.py, keep_derivatives). The unshrunk program 1914 failed
differently: the oracle held a float32 value computed in bfloat16 to float32's tolerance.
"""
import jax
import jax.numpy as jnp
import optax
from jax import lax

from graphopt.fuzz import regression
from graphopt.fuzz_programs import xent


OPT = optax.sgd(0.1)

def loss_fn(params, batch):
    w1, w3, w6, w7, w9, = params["w1"], params["w3"], params["w6"], params["w7"], params["w9"],
    d0, d4, = batch["d0"], batch["d4"],
    v2 = d0 @ w1
    v5 = xent(v2, w3, d4)
    v8 = jnp.concatenate([v5 @ w6, v5 @ w7], axis=-1)
    v10 = v8 @ w9
    v11 = (v10 - v10.mean(0)) * lax.rsqrt(v10.var(0) + 1e-5)
    v12 = jnp.min(v11, axis=0).mean()
    v13 = jnp.max(v8, axis=0).sum()
    v14 = v12.astype(jnp.float32) + v13.astype(jnp.float32)
    return v14, ()

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w1', (3, 2), 'bfloat16', 'param', None),
    ('w3', (2, 4), 'bfloat16', 'param', None),
    ('w6', (3, 3), 'bfloat16', 'param', None),
    ('w7', (3, 3), 'bfloat16', 'param', None),
    ('w9', (6, 2), 'bfloat16', 'param', None),
    ('d0', (6, 3, 3), 'bfloat16', 'batch', None),
    ('d4', (6, 3), 'int32', 'batch', 4),
]
CONFIG = {'options': {'xent_min_bytes': 1, 'xent_chunk': 2, 'chain_ratio': 1.0, 'memory_budget': 0.17, 'remat_micro_batches': 3, 'remat_measure': 'estimate', 'remat_solver': 'greedy'}, 'jit': False, 'passes': ['fuse_parallel_dots', 'fuse_cross_entropy', 'simplify'], 'optimizer': 'optax.sgd(0.1)', 'ad': ('jvp',)}


def test_fuzz_seed_2026_program_1914():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
