"""graphopt.fuzz regression (seed 6 program 112 of an earlier generator): mismatch in outputs.

Found against the working tree after ace031e: the post-AD remat schedule rewrite (no
micro-batches) changes a training step whose loss takes a ``min`` over the batch axis of
batch-normalized values. Cause: XLA fuses the min's gradient mask ``eq(x, min x)`` into
each of its consumers, recomputing ``x`` in each fusion; the rewrite changed the fusions
and one copy rounded ``x`` apart, so consumers disagreed on where the minimum is. Fixed
in ``transforms/remat/rewrite.py``: each float comparison of the forward is materialized once,
through a fence, and every consumer reads that copy.

outputs[0]: float32: max |a-b| 0.0554 > 1e-06 + 1e-05 * 2.32
"""
import jax
import jax.numpy as jnp
import optax
from jax import lax

from graphopt.fuzz import regression


OPT = optax.sgd(0.05, momentum=0.9)

def loss_fn(params, batch):
    w1, = params["w1"],
    d0, = batch["d0"],
    v4 = jnp.sqrt(jnp.abs(w1) + 1)
    v5 = (v4 - v4.mean(0)) * lax.rsqrt(v4.var(0) + 1e-5)
    v6 = jnp.min(v5, axis=0).mean()
    return v6, ()

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w1', (5, 5, 1), 'float32', 'param', None),
    ('d0', (5, 1, 5), 'float32', 'batch', None),
]
CONFIG = {'options': {'memory_budget': 0.86, 'remat_measure': 'estimate'}, 'jit': False, 'passes': ['fuse_parallel_dots'], 'optimizer': 'optax.sgd(0.05, momentum=0.9)', 'ad': ()}


def test_fuzz_seed_6_program_112():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
