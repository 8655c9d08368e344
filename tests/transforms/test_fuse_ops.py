"""Batch-norm folding, parallel dots, matmul chains and chunked cross-entropy fusions."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import graphopt
from graphopt import analysis, ir, testing
from graphopt.models import cnn, gpt
from graphopt.transforms import fuse  # noqa: F401
from graphopt.transforms.fuse_dots import chain_order
from graphopt.transforms.fuse_xent import chunked_cross_entropy

R = np.random.default_rng(0)


def arr(*shape, pos=False):
    a = R.random(shape) + 0.5 if pos else R.normal(size=shape)
    return jnp.asarray(a, jnp.float32)


def n_prims(j, name, ndim=None, lead=None):
    return sum(1 for e, _, _ in ir.walk_eqns(j) if e.primitive.name == name
               and (ndim is None or e.outvars[0].aval.ndim == ndim)
               and (lead is None or e.outvars[0].aval.shape[:len(lead)] == lead))


# ------------------------------------------------------------------------- batch norm

@functools.lru_cache(maxsize=None)   # zoo init compiles its random ops: once per worker
def _cnn():
    key = jax.random.PRNGKey(0)
    p = cnn.init(key, channels=(4, 8))
    for i in range(2):  # non-trivial running statistics
        p[f"bn{i}"] = {k: arr(*v.shape, pos=True) for k, v in p[f"bn{i}"].items()}
    x, _ = cnn.example_batch(key, channels=(4, 8))
    return p, x


def test_batchnorm_folds_into_conv():
    p, x = _cnn()
    r = testing.check_pass("fuse_batchnorm", cnn.apply, p, x)
    assert r.stats.hits["fuse.batchnorm_fold"] == 2
    # Per-activation sub/mul are gone: one bias add per conv remains.
    act = (2, 8, 8)  # activations [N, H, W, C]; the weights are 4-D too
    assert n_prims(r.before, "mul", lead=act) == 4 and n_prims(r.jaxpr, "mul", lead=act) == 0
    assert n_prims(r.jaxpr, "sub", lead=act) == 0 and n_prims(r.jaxpr, "conv_general_dilated") == 2


def test_batchnorm_folds_into_dense():
    x, w = arr(16, 8), arr(8, 4)
    mean, var, scale, bias = arr(4), arr(4, pos=True), arr(4), arr(4)

    def f(x, w, mean, var, scale, bias):
        return (x @ w - mean) / jnp.sqrt(var + 1e-5) * scale + bias
    r = testing.check_pass("fuse_batchnorm", f, x, w, mean, var, scale, bias)
    assert r.stats.hits["fuse.batchnorm_fold"] == 1 and n_prims(r.jaxpr, "div", 2) == 0


def test_batchnorm_must_not_fire():
    p, x = _cnn()
    # Training mode: the statistics are computed from the conv's own output.
    r = testing.check_pass("fuse_batchnorm", lambda p, x: cnn.apply(p, x, train=True), p, x,
                           expect_change=False)
    assert not r.stats.hits
    # Weights larger than the activation: scaling them would cost more.
    x1, w = arr(1, 64), arr(64, 32)
    r = testing.check_pass("fuse_batchnorm", lambda x, w, s, b: x @ w * s + b, x1, w, arr(32),
                           arr(32), expect_change=False)
    assert not r.stats.hits and r.jaxpr is r.before

    # An intermediate read elsewhere.
    def shared(x, w, s, b):
        y = x @ w
        return y * s + b, y
    r = testing.check_pass("fuse_batchnorm", shared, arr(64, 8), arr(8, 4), arr(4), arr(4),
                           expect_change=False)
    assert not r.stats.hits


# ----------------------------------------------------------------------- parallel dots

def test_parallel_qkv_and_gate_up():
    x = arr(16384, 8)  # 512 KiB: more than a CPU cache holds (CPU_CACHE_BYTES)
    ws = [arr(8, 4) for _ in range(3)]

    def qkv(x, wq, wk, wv):
        return jnp.tanh(x @ wq) + (x @ wk) * (x @ wv)
    r = testing.check_pass("fuse_parallel_dots", qkv, x, *ws)
    assert r.stats.hits["fuse.parallel_dots"] == 1
    assert n_prims(r.before, "dot_general") == 3 and n_prims(r.jaxpr, "dot_general") == 1

    def gate_up(x, wg, wu):  # batched activations [B, T, d]
        return jax.nn.silu(x @ wg) * (x @ wu)
    r = testing.check_pass("fuse_parallel_dots", gate_up, arr(2, 8192, 8), ws[0], ws[1])
    assert n_prims(r.jaxpr, "dot_general") == 1


def test_parallel_dots_on_cpu_leave_a_cached_input_alone():
    from graphopt.transforms.fuse_dots import CPU_CACHE_BYTES
    x, ws = arr(64, 8), [arr(8, 4) for _ in range(3)]  # 2 KiB: stays in cache on CPU
    assert x.nbytes <= CPU_CACHE_BYTES

    def qkv(x, wq, wk, wv):
        return jnp.tanh(x @ wq) + (x @ wk) * (x @ wv)
    r = testing.check_pass("fuse_parallel_dots", qkv, x, *ws, expect_change=False)
    assert not r.stats.hits and n_prims(r.jaxpr, "dot_general") == 3
    assert any("stays in a CPU cache" in n for n in r.stats.notes), r.stats.notes
    cj = jax.make_jaxpr(qkv)(x, *ws)  # elsewhere the byte model alone decides: it fires
    res = graphopt.passes.resolve("fuse_parallel_dots")[0](
        cj, graphopt.passes.PassContext(platform="gpu"))
    assert res.stats.hits["fuse.parallel_dots"] == 1


def test_parallel_dots_must_not_fire():
    x = arr(2, 64)   # small activation, large weights: concatenating costs more
    r = testing.check_pass("fuse_parallel_dots", lambda x, a, b: (x @ a, x @ b), x, arr(64, 64),
                           arr(64, 64), expect_change=False)
    assert not r.stats.hits
    # The second weight is computed from the first dot: no common point to fuse at.
    x2, w = arr(64, 8), arr(8, 8)
    r = testing.check_pass("fuse_parallel_dots", lambda x, w: x @ (w + (x @ w)[:8]), x2, w,
                           expect_change=False)
    assert not r.stats.hits
    # Forced on by option, the small case does fuse.
    r = testing.check_pass("fuse_parallel_dots", lambda x, a, b: (x @ a, x @ b), x, arr(64, 64),
                           arr(64, 64), expect_change=False, options={"parallel_dots": "always"})
    assert r.stats.hits["fuse.parallel_dots"] == 1


# ------------------------------------------------------------------------ matmul chain

def test_chain_order_dp():
    # (10x30)(30x5)(5x60): best is ((AB)C) = 2*(1500 + 3000) FLOPs.
    best, split = chain_order([10, 30, 5, 60])
    assert best == 2 * 4500 and split[0, 2] == 1


def test_matmul_chain_reassociates():
    x, a, b = arr(64, 4, pos=True), arr(4, 64, pos=True), arr(64, 4, pos=True)
    # Reassociation rounds differently; cotangents are random normals, hence 1e-4.
    r = testing.check_pass("fuse_matmul_chain", lambda x, a, b, c: ((x @ a) @ b) @ c, x, a, b,
                           arr(4, 64, pos=True), rtol=1e-4)
    assert r.stats.hits["fuse.matmul_chain"] == 1
    assert analysis.program_cost(r.jaxpr).flops == 2 * (4 * 64 * 4 + 64 * 4 * 4 + 64 * 4 * 64)
    assert analysis.program_cost(r.before).flops == 2 * (64 * 4 * 64 + 64 * 64 * 4 + 64 * 4 * 64)


def test_matmul_chain_must_not_fire():
    x, a, b = arr(4, 64), arr(64, 64), arr(64, 64)
    r = testing.check_pass("fuse_matmul_chain", lambda x, a, b: (x @ a) @ b, x, a, b,
                           expect_change=False)
    assert not r.stats.hits   # already the cheapest order

    def shared(x, a, b):
        y = x @ a
        return y @ b, y
    x, a, b = arr(64, 4), arr(4, 64), arr(64, 4)
    r = testing.check_pass("fuse_matmul_chain", shared, x, a, b, expect_change=False)
    assert not r.stats.hits   # the intermediate product is also returned


# ---------------------------------------------------------------------- cross entropy

SIZES = dict(n_layers=1, d_model=16, n_heads=2, seq_len=8, vocab=96)
XOPT = dict(xent_min_bytes=0, xent_chunk=16)


def _gpt(**kw):
    return _gpt_cached(tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _gpt_cached(kw):
    kw = dict(kw)
    key = jax.random.PRNGKey(0)
    p = gpt.init(key, **{**SIZES, **kw})
    return p, gpt.example_batch(key, batch=2, seq_len=8, vocab=p["wte"].shape[0])


def test_cross_entropy_chunked_equal_outputs_and_gradients():
    p, batch = _gpt()
    r = testing.check_pass("fuse_cross_entropy", gpt.loss, p, batch, options=XOPT)
    assert r.stats.hits["fuse.cross_entropy"] == 1
    # No [B, T, V] logits remain; the projection runs in a scan over vocabulary chunks.
    assert any(e.outvars[0].aval.shape == (2, 8, 96) for e, _, _ in ir.walk_eqns(r.before))
    assert not any(e.outvars[0].aval.shape == (2, 8, 96) for e, _, _ in ir.walk_eqns(r.jaxpr))
    assert n_prims(r.jaxpr, "scan") >= 1


def test_cross_entropy_tied_embedding_and_padding():
    p, batch = _gpt(tied=True, vocab=60)   # W = wte.T ([V, d]); 60 is not a multiple of 16
    r = testing.check_pass("fuse_cross_entropy", gpt.loss, p, batch, options=XOPT)
    assert r.stats.hits["fuse.cross_entropy"] == 1


def test_cross_entropy_must_not_fire():
    p, batch = _gpt()
    r = testing.check_pass("fuse_cross_entropy", gpt.loss, p, batch, expect_change=False)
    assert not r.stats.hits    # default cost model: 4 KiB of logits is not worth chunking

    def also_returns_logp(h, w, y):
        logp = jax.nn.log_softmax(h @ w)
        return jnp.take_along_axis(logp, y[:, None], axis=-1).sum(), logp
    r = testing.check_pass("fuse_cross_entropy", also_returns_logp, arr(8, 4), arr(4, 64),
                           jnp.arange(8, dtype=jnp.int32), expect_change=False, options=XOPT)
    assert not r.stats.hits


def test_cross_entropy_gradient_memory():
    h, w = arr(512, 32), arr(32, 4096)
    y = jnp.asarray(R.integers(0, 4096, 512), jnp.int32)

    def loss(h, w, y):
        logp = jax.nn.log_softmax(h @ w)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
    fast = graphopt.optimize(loss, passes=["fuse_cross_entropy"], xent_min_bytes=0, xent_chunk=512)
    g = jax.grad(loss, argnums=(0, 1))
    gf = jax.grad(fast, argnums=(0, 1))
    for a, b in zip(g(h, w, y), gf(h, w, y)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    base = analysis.xla_memory(g, h, w, y)["temp_bytes"]
    fused = analysis.xla_memory(gf, h, w, y)["temp_bytes"]
    hand = analysis.xla_memory(jax.grad(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk=512),
                                        argnums=(0, 1)), h, w, y)["temp_bytes"]
    assert fused < base / 2 and fused <= 1.1 * hand


def test_default_fusions_fire_only_where_they_pay():
    from graphopt.passes import PassContext, Pipeline
    p, batch = _gpt()
    flat, tree = jax.tree_util.tree_flatten((p, batch))
    cj = jax.make_jaxpr(lambda *xs: gpt.loss(*jax.tree_util.tree_unflatten(tree, list(xs))))(*flat)
    # Tiny model on GPU: attention pays; 6 KiB of logits and 1 KiB activations do not.
    out, records = Pipeline(fuse.DEFAULT_FUSIONS).run(cj, PassContext(platform="gpu"))
    hits = {k for r in records for k in r.stats.hits}
    assert hits == {"fuse.attention.causal"}
    # On CPU attention this short is XLA's own computation already: left alone, and said.
    out, records = Pipeline(fuse.DEFAULT_FUSIONS).run(cj, PassContext(platform="cpu"))
    assert not {k for r in records for k in r.stats.hits}
    assert any("left as written on cpu" in n for r in records for n in r.stats.notes)
