"""graphopt.fuzz regression (seed 3 program 23): mismatch in outputs.

Found against the working tree after ace031e: `fold` evaluates `reshape` with
`dimensions=` (transpose, then reshape) as a plain reshape (transforms/prune.py, the
numpy table's "reshape" entry); the transpose of a grouped convolution with a constant
kernel emits one, so the step's gradient is wrong.

outputs[0]: float32: max |a-b| 0.0383 > 1e-06 + 1e-05 * 0.633
"""
import jax
import jax.numpy as jnp
import optax
from jax import lax

from graphopt.fuzz import regression


OPT = optax.sgd(0.1)

def loss_fn(params, batch):
    w1, = params["w1"],
    d0, = batch["d0"],
    v2 = d0 @ w1
    v3 = lax.conv_general_dilated(v2, jnp.array([[[-0.6, -0.3]], [[-0.5, 0.3]], [[-0.3, 0.3]], [[0.0, -1.5]], [[-0.3, -1.6]], [[-0.5, -1.8]]], jnp.float32), (1,), 'VALID', rhs_dilation=(1,), feature_group_count=3)
    v9 = jnp.mean(v3)
    return v9, ()

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w1', (2, 2), 'float32', 'param', None),
    ('d0', (2, 3, 2), 'float32', 'batch', None),
]
CONFIG = {'options': {}, 'jit': False, 'optimizer': 'optax.sgd(0.1)', 'ad': (), 'passes': ['prune']}


def test_fuzz_seed_3_program_23():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
