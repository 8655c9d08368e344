"""graphopt.fuzz regression (seed 2026 program 5966): mismatch in outputs.

outputs[0]: NaN in different places (0 vs 9)

Fixed (a graphopt bug of the seed 6 program 112 kind): a min over a batch-normalized batch,
post-AD remat. The remat pass pinned the min's gradient mask eq(x, min x) once, but XLA
still computed x twice, in the reduction's fusion and in the comparison's, with an rsqrt
rounded apart, so a column's mask came out empty and its gradient 0/0: NaN in the update
where the original (compiled at the default level, and op by op) has none. A value both
reduced by a max/min and compared is now materialized once behind a fence before its
first reader (transforms/remat/rewrite.py, _chosen_and_compared).
"""
import jax
import jax.numpy as jnp
import optax
from jax import lax

from graphopt.fuzz import regression
from graphopt.fuzz_programs import bn_affine


OPT = optax.sgd(0.1)

def loss_fn(params, batch):
    w1, w3, = params["w1"], params["w3"],
    d0, d1, = batch["d0"], batch["d1"],
    v2 = d0 @ w1
    v4 = lax.conv_general_dilated(v2, w3, (1,), 'VALID', rhs_dilation=(1,), feature_group_count=3)
    v6 = jnp.matmul(d1, jnp.array([[4, 0, 0], [2, 1, 3], [2, 2, 2]], jnp.uint8), precision='highest')
    v25 = bn_affine(v4 @ jnp.array([[0.6, 0.4, 1.9], [0.3, -1.1, -0.2]], jnp.float32), jnp.array([1.5, -0.9, -0.2], jnp.float32), jnp.array([2.2, 1.1, -1.7], jnp.float32), jnp.array([0.4, 0.0, 0.7], jnp.float32), jnp.array([-0.4, -0.8, 2.1], jnp.float32))
    v28 = (v25 - v25.mean(0)) * lax.rsqrt(v25.var(0) + 1e-5)
    v29 = jnp.min(v28, axis=0).mean()
    return v29, (v6,)

def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('w1', (3, 3), 'float32', 'param', None),
    ('w3', (9, 1, 2), 'float32', 'param', None),
    ('d0', (6, 3, 3), 'float32', 'batch', None),
    ('d1', (6, 3), 'uint8', 'batch', None),
]
CONFIG = {'options': {'memory_budget': 0.26, 'remat_micro_batches': 2, 'remat_measure': 'estimate', 'remat_solver': 'greedy', 'remat_order_backward': False, 'remat_narrow_fence': True}, 'jit': True, 'optimizer': 'optax.sgd(0.1)', 'ad': ()}


def test_fuzz_seed_2026_program_5966():
    regression(step, INPUTS, CONFIG, kind='step', opt=OPT)
