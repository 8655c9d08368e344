"""graphopt.fuzz regression (seed 7 program 661): crash in jvp of the optimized program.

Found against the working tree after ace031e: pre-AD remat turns segments into
``custom_vjp`` functions, so ``jax.jvp`` of the optimized function fails where the
original's works.

TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp function.
"""
import jax.numpy as jnp

from graphopt.fuzz import regression
from graphopt.fuzz_programs import custom_jvp


def f(x2, x3):
    v4 = jnp.matmul(x2, x3, precision='highest')
    def f9(a5):
        return (a5,)
    v9, = custom_jvp(f9)(v4)
    v10 = jnp.sum(v4, axis=(0, 3), keepdims=True)
    v11 = jnp.round(jnp.clip(v9, -50, 50)).astype(jnp.int32)
    return (v11, v10)


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('x2', (1, 3, 1, 1), 'float32', 'arg', None),
    ('x3', (1, 2), 'float32', 'arg', None),
]
CONFIG = {'options': {'memory_budget': 0.17}, 'jit': False, 'ad': ('jvp',), 'passes': ['prune']}


def test_fuzz_seed_7_program_661():
    regression(f, INPUTS, CONFIG, kind='fn', x64=True)
