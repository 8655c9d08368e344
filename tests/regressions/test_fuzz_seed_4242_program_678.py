"""graphopt.fuzz regression (seed 4242 program 678): crash in compiling of the optimized program.

ValueError: The precision 'F16_F16_F32' is not supported by dot_general on CPU

Fixed (graphopt's): the forced attention fusion on float16 on CPU chose JAX's own
jax.nn.dot_product_attention, whose XLA implementation asks for the F16_F16_F32 dot
algorithm that XLA CPU rejects at compile time; graphopt's own kernel is used there now
(transforms/fuse_attention.py).
"""
import jax.numpy as jnp
from jax import lax

from graphopt.fuzz import regression
from graphopt.fuzz_programs import attention


def f(x1, x22, x23):
    v24 = attention(x1, x1 @ x22, x1 @ x23, causal=True, fill=-jnp.inf)
    def f33(carry, a26):
        a25, = carry
        return (a25,), (a25,)
    (v33,), (v34,) = lax.scan(f33, (v24,), v24, reverse=False)
    return (v34,)


INPUTS = [  # name, shape, dtype, role, integers drawn below
    ('x1', (1, 2, 2), 'float16', 'arg', None),
    ('x22', (2, 2), 'float16', 'arg', None),
    ('x23', (2, 2), 'float16', 'arg', None),
]
CONFIG = {'options': {}, 'jit': False, 'passes': ['fuse'], 'ad': ()}


def test_fuzz_seed_4242_program_678():
    regression(f, INPUTS, CONFIG, kind='fn')
