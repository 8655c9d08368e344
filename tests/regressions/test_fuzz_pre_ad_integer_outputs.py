"""graphopt.fuzz regression (seed 7 program 272, shrunk by hand): crash in remat: TypeError.

Found against the working tree after ace031e: ``graphopt.optimize(f, memory_budget=...)``
on a function (pre-AD remat) whose outputs are all integers crashes in ``jax.grad``
("grad requires real-valued outputs ... int32") instead of leaving it alone.

PassError: pass 'remat' failed: TypeError: grad requires real-valued outputs (output dtype
"""
import jax.numpy as jnp

from graphopt.fuzz import regression


def f(x1):
    v2 = jnp.sin(x1) @ x1.T
    v3 = jnp.argmax(v2, axis=0)
    return (v3,)


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('x1', (3, 3), 'float32', 'arg', None),
]
CONFIG = {'options': {'memory_budget': 0.5}, 'jit': False, 'passes': ['prune'], 'ad': ()}


def test_fuzz_pre_ad_integer_outputs():
    regression(f, INPUTS, CONFIG, kind='fn')
