"""graphopt.fuzz regression (seed 2026 program 1028): mismatch in jit.

jit[0]: float32: max |a-b| 0.102 > 1e-06 + 1e-05 * 2.32

Diagnosed: not graphopt's. A max and two mins over a batch-normalized batch of three, with
micro-batches, through the end-to-end jax.jit path. Three evaluations of the original
disagree: op by op (which float64 confirms) and jax.jit differ by 0.1 in w2's update (XLA
fuses a max's gradient mask into consumers that round its operand apart), and the
optimized step lands 0.01 from the jit original. The jit path of the oracle now also
accepts a value equal to the op-by-op original, or no further from it than ten times the
compiled original is (the float64 rule, with JAX's definition as the truth).
"""
import jax
import jax.numpy as jnp
import optax
from jax import lax

from graphopt.fuzz import regression
from graphopt.fuzz_programs import xent


OPT = optax.sgd(0.1)

def loss_fn(params, batch):
    w2, = params["w2"],
    d0, d2, d3, d3, = batch["d0"], batch["d2"], batch["d3"], batch["d3"],
    v1 = d0 @ jnp.array([[1.7, -0.9, -0.4, 2.7, 0.9], [-0.2, -2.0, -0.3, -0.5, 1.6], [-1.9, 2.0, 0.5, 0.2, -0.7], [-0.3, 1.2, 0.1, 0.5, 0.9], [0.2, 0.6, -0.1, 1.3, -0.4]], jnp.float32)
    v4 = xent(v1, w2, d3)
    v12 = (v4 - v4.mean(0)) * lax.rsqrt(v4.var(0) + 1e-5)
    v13 = jnp.max(v12, axis=0).sum()
    v14 = jnp.min(v12, axis=0).mean()
    v15 = jnp.min(v4, axis=0).mean()
    v16 = v13.astype(jnp.float32) + v14.astype(jnp.float32) + v15.astype(jnp.float32)
    v17 = v13
    v18 = jnp.sum(d2, axis=0)
    v19 = v12
    return v16, (v17, v18, v19)

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w2', (5, 6), 'float32', 'param', None),
    ('d0', (3, 3, 5), 'float32', 'batch', None),
    ('d2', (3, 3), 'bool', 'batch', None),
    ('d3', (3, 3), 'float16', 'batch', None),
    ('d3', (3, 3), 'int32', 'batch', 6),
]
CONFIG = {'options': {'xent_min_bytes': 1, 'xent_chunk': 2, 'chain_ratio': 1.0, 'memory_budget': 0.88, 'remat_micro_batches': True, 'remat_measure': 'estimate', 'remat_solver': 'greedy'}, 'jit': True, 'optimizer': 'optax.sgd(0.1)', 'ad': ()}


def test_fuzz_seed_2026_program_1028():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
