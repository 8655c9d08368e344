"""Edge cases found in review: each once gave a crash or a silently wrong result."""
import gc
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import Mesh, PartitionSpec as P

import graphopt
from graphopt import ir, patterns, testing
from graphopt.transforms import prune

# Registered after graphopt's import, so graphopt does not know it.
late_p = Primitive("graphopt_test_unknown_edge")
late_p.def_impl(lambda x: x * 3.0)
late_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(late_p, mlir.lower_fun(lambda x: x * 3.0, multiple_results=False))


def test_fold_leaves_collectives_inside_shard_map_alone():
    mesh = Mesh(np.array(jax.devices()[:1]), ("i",))

    def f(x):
        def body(b):
            return jnp.zeros_like(b) + b * jax.lax.axis_index("i").astype(b.dtype) + jax.lax.psum(1.0, "i")
        return jax.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=P("i"))(x)
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(graphopt.optimize(f)(x), jax.jit(f)(x))


def test_user_pattern_respects_the_axis_of_flip():
    rule = patterns.rewrite(lambda x: jnp.flip(x, 0) + 1.0, lambda x: jnp.flip(x + 1.0, 0),
                            jnp.ones((2, 3)), name="flip_add")
    try:
        f = lambda x: jnp.flip(x, axis=1) + 1.0  # noqa: E731 (flips the other axis)
        g = lambda x: jnp.flip(x, axis=0) + 1.0  # noqa: E731
        x = jnp.arange(6.0).reshape(2, 3)
        opt_f, opt_g = (graphopt.optimize(h, passes=["user_rewrites"]) for h in (f, g))
        np.testing.assert_array_equal(opt_f(x), f(x))
        assert not opt_f.report(x).hits()
        np.testing.assert_array_equal(opt_g(x), g(x))
        assert opt_g.report(x).hits()["flip_add"] == 1
    finally:
        patterns.unregister(rule)


def test_batchnorm_not_folded_into_low_precision_weights_of_a_wide_dot():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (64, 32)).astype(jnp.bfloat16)
    w = jax.random.normal(k[1], (32, 16)).astype(jnp.bfloat16)
    s = jax.random.normal(k[2], (16,))
    h = lambda x, w, s: jnp.dot(x, w, preferred_element_type=jnp.float32) * s + 1.0  # noqa: E731
    opt = graphopt.optimize(h, check=True)
    assert testing.max_rel_error(opt(x, w, s), h(x, w, s)) < 1e-5
    assert not any(k.startswith("fuse.batchnorm") for k in opt.report(x, w, s).hits())


def test_error_metric_sees_the_imaginary_part():
    a = np.array([1 + 1j, 2 + 2j])
    assert testing.max_rel_error(a, np.conj(a)) > 0.5
    assert testing.max_rel_error(a, a) == 0.0


def test_check_under_jit_with_typed_prng_keys():
    f = lambda key, x: x * jax.random.normal(key, x.shape)  # noqa: E731
    key, x = jax.random.key(0), jnp.ones(3)
    np.testing.assert_array_equal(jax.jit(graphopt.optimize(f, check=True))(key, x), f(key, x))


def test_static_argnums_inside_varargs():
    def f(*args):
        return args[0] * (2.0 if args[1] == "double" else 1.0)
    o = graphopt.optimize(f, static_argnums=1)
    np.testing.assert_array_equal(o(jnp.ones(2), "double"), jnp.full(2, 2.0))
    np.testing.assert_array_equal(o(jnp.ones(2), "single"), jnp.ones(2))


def test_python_bool_is_one_cache_entry_in_and_out_of_jit():
    o = graphopt.optimize(lambda x, flag: jnp.where(flag, x, -x))
    o(jnp.ones(2), True)
    jax.jit(o)(jnp.ones(2), True)
    assert len(o._cache) == 1


def test_unknown_primitive_in_a_dead_while_carry_is_kept():
    def f(x):
        def body(c):
            i, live, dead = c
            return i + 1, live + 1.0, late_p.bind(dead)
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x, x))[1]
    cj = jax.make_jaxpr(f)(jnp.ones(2))
    out = prune.dce(cj).jaxpr
    assert ir.primitive_counts(out).get(late_p.name) == 1


def test_fusion_sweep_keeps_dead_cond_holding_an_unknown_primitive():
    def f(x, w1, w2):
        jax.lax.cond(x.sum() > 0, lambda v: late_p.bind(v), lambda v: v, x)  # dead, but unknown
        return (x @ w1).sum() + (x @ w2).sum()
    x, w = jnp.ones((64, 4)), jnp.ones((4, 4))
    o = graphopt.optimize(f, passes=["fuse_parallel_dots"], parallel_dots="always")
    assert ir.primitive_counts(o.jaxpr(x, w, w)).get(late_p.name) == 1
    np.testing.assert_allclose(o(x, w, w), f(x, w, w))


def test_report_keeps_no_input_arrays_alive():
    o = graphopt.optimize(lambda x: jnp.sin(x) * 1.0, jit=False)
    x = jnp.ones((1024, 1024))
    ident = id(x)
    o(x)
    del x
    gc.collect()
    assert all(id(a) != ident for a in jax.live_arrays())
    assert o.report(jnp.ones((1024, 1024))).xla_memory()["before"]["argument_bytes"] == 4 * 2**20


def test_report_command_loads_a_module_with_dataclasses(tmp_path):
    src = tmp_path / "dc_model.py"
    src.write_text("from __future__ import annotations\nimport dataclasses\nimport jax.numpy as jnp\n"
                   "@dataclasses.dataclass\nclass Cfg:\n    n: int = 3\n"
                   "def factory():\n    return (lambda x: x * 1.0), (jnp.ones(Cfg().n),)\n")
    out = subprocess.run([sys.executable, "-m", "graphopt", "report", f"{src}:factory",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "simplify.mul_one" in out.stdout
