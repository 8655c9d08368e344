"""graphopt.fuzz regression (seed 7 program 950): crash in remat: PassError.

Found against the working tree after ace031e: pre-AD remat (``optimize(f,
memory_budget=...)``) differentiates a function holding a ``while_loop`` and crashes
("Reverse-mode differentiation does not work for lax.while_loop") instead of leaving
it alone or refusing clearly.

PassError: pass 'remat' failed: ValueError: Reverse-mode differentiation does not work for lax.while
"""
import jax.numpy as jnp
from jax import lax

from graphopt.fuzz import regression
from graphopt.fuzz_programs import attention


def f(x1, x2, x3):
    def f25(carry, a19):
        a16, a17, a18, = carry
        def f23(c):
            i, a20, a21, = c
            v22 = attention(a21, a21 @ jnp.array([[-0.3, 0.2, -1.0, -0.5], [-0.5, -1.4, 1.2, 0.2], [0.1, -0.8, -0.5, -0.3], [-1.6, 0.4, 2.1, -0.5]], jnp.float32), a21 @ jnp.array([[0.4, 1.0, -0.5, -0.1], [0.2, 1.0, -0.2, -1.3], [-0.4, 0.1, -0.9, 1.1], [0.5, -0.9, 0.5, 0.8]], jnp.float32), causal=True, fill=-1.0)
            return (i + 1, a20, v22)
        _, v23, v24, = lax.while_loop(lambda c: c[0] < 1, f23, (jnp.int32(0), a19, x1))
        return (v24, a17, a18), (v24,)
    (v25, v26, v27), (v28,) = lax.scan(f25, (x1, x2, x3), x1, reverse=False)
    return (v28,)


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('x1', (4, 1, 4), 'float32', 'arg', None),
    ('x2', (4,), 'int32', 'arg', None),
    ('x3', (4,), 'uint32', 'arg', None),
]
CONFIG = {'options': {'memory_budget': 0.16}, 'jit': False, 'passes': ['cse'], 'ad': ()}


def test_fuzz_seed_7_program_950():
    regression(f, INPUTS, CONFIG, kind='fn')
