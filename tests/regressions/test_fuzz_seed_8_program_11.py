"""graphopt.fuzz regression (seed 8 program 11): crash in jvp of the optimized program.

Found against HEAD ace031e (fixed in the working tree since): after
`fuse_cross_entropy` the function holds a `custom_vjp`, so `jax.jvp` of the optimized
function fails where the original's works.

TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp function.
"""
from jax import lax

from graphopt.fuzz import regression
from graphopt.fuzz_programs import xent


def f(x2, x5, x19, x20):
    def f11(carry, a4):
        a3, = carry
        return (a3,), (a3,)
    (v11,), (v12,) = lax.scan(f11, (x5,), x2, reverse=False)
    v21 = xent(v12, x19, x20)
    return (v21,)


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('x2', (2, 2, 2), 'float64', 'arg', None),
    ('x5', (2, 2), 'float64', 'arg', None),
    ('x19', (2, 4), 'float64', 'arg', None),
    ('x20', (2, 2), 'int32', 'arg', 4),
]
CONFIG = {'options': {'xent_min_bytes': 1, 'xent_chunk': 2}, 'jit': False, 'ad': ('jvp',), 'passes': ['fuse_cross_entropy']}


def test_fuzz_seed_8_program_11():
    regression(f, INPUTS, CONFIG, kind='fn', x64=True)
