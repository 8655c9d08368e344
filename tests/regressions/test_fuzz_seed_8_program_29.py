"""graphopt.fuzz regression (seed 8 program 29): crash in remat: PassError.

Found against HEAD ace031e (fixed in the working tree since): remat's `apply_post_ad`
hashed a Literal operand (a max/min's init) while looking for backward values.

PassError: pass 'remat' failed: TypeError: unhashable type: 'Literal'
"""
import jax
import jax.numpy as jnp
import optax

from graphopt.fuzz import regression


OPT = optax.adam(0.01)

def loss_fn(params, batch):
    w4, = params["w4"],
    d0, = batch["d0"],
    v10 = jax.nn.logsumexp(w4, axis=-1)
    v14 = jnp.min(v10, axis=0).mean()
    return v14, (d0,)

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w4', (1, 2), 'bfloat16', 'param', None),
    ('d0', (2, 1), 'bfloat16', 'batch', None),
]
CONFIG = {'options': {'memory_budget': 0.43}, 'jit': False, 'optimizer': 'optax.adam(0.01)', 'ad': (), 'passes': ['prune']}


def test_fuzz_seed_8_program_29():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
