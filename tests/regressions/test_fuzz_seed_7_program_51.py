"""graphopt.fuzz regression (seed 7 program 51): crash in remat: PassError.

Found against the working tree after ace031e: ``graphopt.optimize(f, memory_budget=...)``
on a function (pre-AD remat) with no float input or output crashes (``max()`` of an
empty sequence) instead of leaving it alone.

PassError: pass 'remat' failed: ValueError: max() arg is an empty sequence
"""
from graphopt.fuzz import regression


def f(x1):
    return (x1,)


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('x1', (1, 1, 1), 'uint8', 'arg', None),
]
CONFIG = {'options': {'memory_budget': 0.59}, 'jit': False, 'ad': (), 'passes': ['prune']}


def test_fuzz_seed_7_program_51():
    regression(f, INPUTS, CONFIG, kind='fn', x64=True)
