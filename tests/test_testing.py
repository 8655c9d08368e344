"""graphopt.testing.check_pass: options reach the pass (checked as optimize checks them),
and every invariant it claims to check fails on a pass that breaks it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from graphopt import OptionError, testing
from graphopt.errors import EquivalenceError, PassError
from graphopt.passes import Pass, PassContext, PassResult
from graphopt.transforms import precision as P

V = jnp.array([0.3, -1.2, 2.5], jnp.float32)


def fold_me(x):  # fold turns the 16-float constant product into one constant
    return x + jnp.arange(16.0).reshape(4, 4) * 2.0


def swap_to(g, name="swap"):
    """A pass that replaces the program with ``g`` traced at the same avals, once."""
    done = set()

    def run(cj, ctx):
        if id(cj) in done:
            return PassResult(cj, False)
        out = jax.make_jaxpr(g)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in cj.in_avals])
        done.add(id(out))
        return PassResult(out, True)
    return Pass(name, run)


def test_options_are_checked_normalized_and_reach_the_pass():
    x = jnp.ones((4, 4))
    small = testing.check_pass("fold", fold_me, x, options={"fold_max_bytes": 32},
                               expect_change=False)
    assert not small.changed and small.jaxpr is small.before and small.comparison == {}
    big = testing.check_pass("fold", fold_me, x, options={"fold_max_bytes": "1MiB"})
    assert big.stats.hits["fold.mul"] == 1 and big.comparison["outputs"]["ok"]


def test_misspelt_or_bad_option_is_an_option_error():
    with pytest.raises(OptionError, match=r"check_pass\(fold\).*'fold_max_byte'.*did you mean"):
        testing.check_pass("fold", fold_me, jnp.ones((4, 4)), options={"fold_max_byte": 32})
    with pytest.raises(OptionError, match="fold_max_bytes"):
        testing.check_pass("fold", fold_me, jnp.ones((4, 4)), options={"fold_max_bytes": "lots"})


def test_options_merge_over_ctx_options_and_keep_its_placement():
    seen = []

    def spy(cj, ctx):
        seen.append((ctx.placement, dict(ctx.options)))
        return PassResult(cj, False)
    ctx = PassContext(placement="post-AD", options={"fold_max_bytes": 32, "xent_chunk": 8})
    testing.check_pass(spy, jnp.sin, V, ctx=ctx, options={"fold_max_bytes": "1KiB"},
                       expect_change=False)
    assert seen[0] == ("post-AD", {"fold_max_bytes": 1024, "xent_chunk": 8})
    assert ctx.options["fold_max_bytes"] == 32  # the caller's context is not mutated


def test_an_option_with_a_tolerance_sets_the_default_rtol():
    w = jax.random.normal(jax.random.PRNGKey(0), (8, 8)) / 3
    f = lambda w, x: jnp.sum(jnp.tanh(x @ w))  # noqa: E731
    x = jnp.ones((4, 8))
    res = testing.check_pass(P.precision, f, w, x, options={"precision": "bfloat16"})
    assert res.comparison["gradients"]["max_rel_err"] > 1e-5  # bfloat16 really differs
    with pytest.raises(EquivalenceError, match="differ"):
        testing.check_pass(P.precision, f, w, x, options={"precision": "bfloat16"}, rtol=1e-6)


@pytest.mark.parametrize("jit", [True, False])
def test_wrong_outputs_are_caught(jit):
    with pytest.raises(EquivalenceError, match="outputs differ after \\['swap'\\]"):
        testing.check_pass(swap_to(jnp.cos), jnp.sin, V, jit=jit)


def test_wrong_gradients_with_equal_outputs_are_caught():
    with pytest.raises(EquivalenceError, match="gradients differ"):
        testing.check_pass(swap_to(lambda x: x * lax.stop_gradient(x)), lambda x: x * x, V)


def test_integer_outputs_compare_exactly():
    f = lambda i: i * 2  # noqa: E731
    with pytest.raises(EquivalenceError, match="outputs differ"):
        testing.check_pass(swap_to(lambda i: i * 2 + 1), f, jnp.arange(3))
    res = testing.check_pass(swap_to(lambda i: i + i), f, jnp.arange(3))
    assert res.comparison["outputs"]["max_rel_err"] == 0.0 and "gradients" not in res.comparison


def test_not_idempotent_and_unreported_changes_are_caught():
    always = Pass("always", lambda cj, ctx: PassResult(jax.make_jaxpr(jnp.sin)(V), True))
    with pytest.raises(AssertionError, match="not idempotent"):
        testing.check_pass(always, jnp.sin, V)
    silent = Pass("silent", lambda cj, ctx: PassResult(jax.make_jaxpr(jnp.sin)(V), False))
    with pytest.raises(AssertionError, match="'silent' says it changed nothing"):
        testing.check_pass(silent, jnp.sin, V, expect_change=False)
    boast = Pass("boast", lambda cj, ctx: PassResult(cj, True))
    with pytest.raises(AssertionError, match="'boast' says it changed something but returned its"):
        testing.check_pass(boast, jnp.sin, V)


def test_expect_change_and_changed_interface():
    with pytest.raises(AssertionError, match="changed nothing"):
        testing.check_pass("cse", jnp.sin, V)
    with pytest.raises(PassError, match="changed the outputs"):
        testing.check_pass(swap_to(lambda x: x[:2]), jnp.sin, V)


def test_a_closed_jaxpr_is_checked_as_given():
    cj = jax.make_jaxpr(lambda x: jnp.sin(x) + jnp.sin(x))(V)
    res = testing.check_pass("cse", cj, V)
    assert res.before is cj and res.stats.hits["cse.sin"] == 1


def _while_sin(x):  # a while loop: JAX cannot reverse-differentiate it
    return lax.while_loop(lambda c: c[0] < 1, lambda c: (c[0] + 1, jnp.sin(c[1])), (0, x))[1]


def test_gradients_skipped_only_where_the_original_has_none():
    res = testing.check_pass(swap_to(lambda x: _while_sin(x) * 1.0), _while_sin, V)
    assert "not reverse-differentiable" in res.comparison["gradients"]["skipped"]
    # the original differentiates and the rewrite does not: that is the pass's failure
    with pytest.raises(Exception, match="(?i)reverse-mode differentiation|while_loop"):
        testing.check_pass(swap_to(_while_sin), jnp.sin, V)


def test_check_pass_tolerates_nan_in_the_same_places():
    x = jnp.array([np.nan, np.inf, 1.0], jnp.float32)
    res = testing.check_pass(swap_to(lambda x: x * 1.0 + 0.0), lambda x: x + 0.0, x)
    assert res.comparison["outputs"]["ok"]
