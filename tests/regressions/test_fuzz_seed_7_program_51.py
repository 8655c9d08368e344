"""graphopt.fuzz regression (seed 7 program 51): crash in remat: PassError.

Found against the working tree after ace031e: ``graphopt.optimize(f, memory_budget=...)``
on a function (pre-AD remat) with no float input or output crashes (``max()`` of an
empty sequence) instead of leaving it alone.

PassError: pass 'remat' failed: ValueError: max() arg is an empty sequence
"""
import jax  # noqa: F401 (what generated programs may use)
import jax.numpy as jnp  # noqa: F401
import numpy as np  # noqa: F401
import optax  # noqa: F401
from jax import lax  # noqa: F401

from graphopt.fuzz import check_function


def f(x1):
    return (x1,)


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('x1', (1, 1, 1), 'uint8', 'arg', None),
]
CONFIG = {'options': {'memory_budget': 0.59}, 'jit': False, 'ad': (), 'passes': ['prune']}


def test_fuzz_seed_7_program_51():
    out = check_function(f, INPUTS, CONFIG, kind='fn', x64=True, ad=())
    assert not out.failed, out.detail
