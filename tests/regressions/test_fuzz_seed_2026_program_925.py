"""graphopt.fuzz regression (seed 2026 program 925): crash in remat: ValueError.

PassError: pass 'remat' failed: ValueError: zero-size array to reduction operation minimum which has
no identity. Cause: on this one-element step a segment's live-in came from a piece at or
after the segment's start, so the greedy solver's chain had zero states. Fixed in
``transforms/remat/greedy.py`` (such a live-in is charged in full); the budget is now
refused with a BudgetError naming the floor, and the oracle checks the program there.
"""
import jax
import jax.numpy as jnp
import optax

from graphopt.fuzz import regression


OPT = optax.adam(0.01, eps=1e-3)

def loss_fn(params, batch):
    w1, w15, = params["w1"], params["w15"],
    d0, d10, = batch["d0"], batch["d10"],
    v2 = d0 @ w1
    v6 = jnp.log1p(jnp.abs(v2))
    v13 = jnp.where(v6 > v2, v6, v2)
    v16 = jnp.matmul(v13, w15, precision='highest')
    v19 = jnp.mean(v16)
    return v19, (d10,)

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w1', (1, 1), 'float32', 'param', None),
    ('w15', (1, 1), 'float32', 'param', None),
    ('d0', (1, 1, 1), 'float32', 'batch', None),
    ('d10', (1, 1), 'int32', 'batch', 1),
]
CONFIG = {'options': {'memory_budget': 0.78}, 'jit': False, 'optimizer': 'optax.adam(0.01, eps=1e-3)', 'ad': (), 'passes': ['prune']}


def test_fuzz_seed_2026_program_925():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
