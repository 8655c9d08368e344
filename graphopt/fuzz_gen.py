"""The random program generator of :mod:`graphopt.fuzz` (:func:`generate`): operations
drawn from shape and dtype rules, blocks nested up to three deep, training steps. The
program types and their rendering to Python are in :mod:`graphopt.fuzz_programs`.
"""
from __future__ import annotations

import numpy as np

import jax

from .fuzz_programs import BLOCKS, NAME, NAMESPACE, Input, Program, Stmt, kind_of

# ------------------------------------------------------------------------ operations
# An op maps (generator, primary operand, its shape, its dtype) to an expression; one that
# raises or does not type-check is drawn again. Operands come from g.operand / g.match.
UN = {"f": "jnp.sin({x}) | jnp.tanh({x}) | jnp.exp(jnp.tanh({x})) | jnp.log1p(jnp.abs({x})) | "
           "jnp.sqrt(jnp.abs({x}) + 1) | jax.nn.relu({x}) | jax.nn.sigmoid({x}) | -{x} | "
           "{x} * {x} | jnp.abs({x}) | {x} * 1.0 | {x} + 0.0 | {x} / 1.0 | -(-{x}) | {x} - {x} | "
           "{x} * 0.0 | jax.nn.gelu({x}) | jnp.floor({x}) | lax.stop_gradient({x}) | "
           "jnp.clip({x}, -1, 1) | jnp.sign({x}) | {x} ** 3 | jnp.where({x} > 0, {x}, 0.1 * {x}) | "
           "lax.rsqrt(jnp.abs({x}) + 1) | jnp.log({x}) | jnp.cos({x}) + jnp.cos({x}) | "
           "{x} * 2.5 * 0.25 | jnp.round({x} * 4) / 4 | jnp.power(jnp.abs({x}) + 1, 1.5) | "
           "lax.erf({x}) | {x} + jnp.arange({x}.shape[-1], dtype={x}.dtype) | "
           "{x} * jnp.full({x}.shape, 2, {x}.dtype)",
      "i": "-{x} | ~{x} | {x} // 3 | {x} % 3 | jnp.abs({x}) | {x} * 2 + 1 | {x} >> 1 | {x} << 1 | "
           "jnp.clip({x}, 0, 5) | {x} + 0 | {x} * 1 | jnp.sign({x}) | {x} - {x} | "
           "{x} + jnp.arange({x}.shape[-1], dtype={x}.dtype)",
      "b": "~{x} | jnp.logical_not({x}) | {x} & {x} | {x} ^ True | {x} || False",
      "bin": "{x} + {y} | {x} - {y} | {x} * {y} | jnp.maximum({x}, {y}) | jnp.minimum({x}, {y}) | "
             "jnp.where({x} > {y}, {x}, {y})",
      "bin f": "{x} / (jnp.abs({y}) + 1) | jnp.arctan2({x}, {y})",
      "bin i": "{x} & {y} | {x} || {y} | {x} ^ {y} | {x} // (jnp.abs({y}) % 4 + 1)",
      "bin b": "{x} & {y} | {x} || {y} | {x} ^ {y} | {x} == {y} | jnp.where({x}, {y}, ~{y})",
      "cmp": "{x} > {y} | {x} <= {y} | {x} == {y} | {x} != {y} | {x} > 0",
      "red": "jnp.sum({x}, axis={A}) | jnp.max({x}, axis={A}) | jnp.min({x}, axis={A}) | "
             "jnp.argmax({x}, axis={a}) | jnp.argmin({x}, axis={a}) | "
             "jnp.sum({x}, axis={A}, keepdims=True)",
      "red f": "jnp.mean({x}, axis={A}) | jax.nn.logsumexp({x}, axis={A}) | "
               "jnp.var({x}, axis={A}) | jnp.prod(jnp.tanh({x}), axis={A}) | "
               "jax.nn.softmax({x}, axis={a}) | jax.nn.log_softmax({x}, axis={a})",
      "red b": "jnp.any({x}, axis={A}) | jnp.all({x}, axis={A}) | jnp.sum({x}, axis={A}) | "
               "jnp.max({x}, axis={A})",
      "cum": "jnp.cumsum({x}, axis={a}) | lax.cummax({x}, axis={a}, reverse={r}) | "
             "lax.cummin({x}, axis={a}, reverse={r}) | jnp.sort({x}, axis={a}) | "
             "jnp.argsort({x}, axis={a}, stable=True) | lax.top_k({x}, {k})[0] | "
             "lax.top_k({x}, {k})[1] | lax.sort(({x}, {y}), dimension={a}, num_keys=1)[1]",
      "cum f": "jnp.cumprod(jnp.tanh({x}), axis={a}) | lax.cumsum({x}, axis={a}, reverse={r}) | "
               "lax.cumlogsumexp({x}, axis={a}, reverse={r})",
      "shape": "jnp.expand_dims({x}, {a0}) | jnp.broadcast_to({x}, (2,) + {x}.shape) | {x}.T | "
               "jnp.transpose({x}, {perm}) | jnp.flip({x}, axis={a}) | {x}.reshape(-1) | "
               "jnp.repeat({x}, 2, axis={a}) | {x}[{sl}] | jnp.concatenate([{x}, {y}], axis={a}) | "
               "lax.pad({x}, jnp.zeros((), {x}.dtype), {pads}) | jnp.pad({x}, 1, mode='{mode}') | "
               "{x}.reshape({x}.shape[:{a0}] + (-1,) + {x}.shape[{a0} + 2:]) | "
               "{x}.reshape({x}.shape[:{a}] + (2, -1) + {x}.shape[{a} + 1:]) | "
               "jnp.squeeze({x}, {one})"}
UN = {k: [t.replace("||", "|") for t in v.split(" | ")] for k, v in UN.items()}  # "||": or
FORMS = {k: UN[k] for k in ("f", "i", "b")} | {"u": UN["i"]}


def _elementwise(g, x, s, d):
    k, r, to = kind_of(d), g.rng.random(), g.pick("fiub")
    if r < 0.15:  # a conversion
        return (f"jnp.round(jnp.clip({x}, -50, 50)).astype(jnp.{g.dtype(to)})" if k == "f"
                and to in "iu" else f"({x} > 0)" if to == "b" and k != "b"
                else f"{x}.astype(jnp.{g.dtype(to)})")
    if r < 0.55:
        return g.pick(FORMS[k]).format(x=x)
    forms = UN["bin b"] if k == "b" else (UN["bin"] + UN["cmp"]
                                           + UN["bin f" if k == "f" else "bin i"])
    return g.pick(forms).format(x=x, y=g.match(s, d))


def _reduce(g, x, s, d):
    c, k = g.rand(4), kind_of(d)
    axes = None if c == 0 else (0, len(s) - 1) if c == 1 and len(s) > 1 else g.axis(s)
    a = -1 if g.model and len(s) > 1 else g.axis(s)  # model: keep the batch axis
    forms = UN["red b"] if k == "b" else UN["red"] + UN["red f"] * (k == "f")
    return g.pick(forms).format(x=x, a=a, A=a if g.model else axes)


def _dot(g, x, s, d):
    n, r, c = g.size(), len(s), g.rng.random() + 0.25 * g.model
    if c < 0.25 and r >= 3:  # batch dims
        w = g.operand((s[0], s[-1], n), d)
        return f"lax.dot_general({x}, {w}, ((({r - 1},), (1,)), ((0,), (0,))))"
    if c < 0.4 and kind_of(d) == "f":  # a chain, or parallel dots on a shared input
        m = g.size() + 1
        w1, w2 = g.operand((s[-1], m), d), g.operand((m, n) if c < 0.32 else (s[-1], n), d)
        return (f"({x} @ {w1}) @ {w2}" if c < 0.32 else g.pick(
            ["jnp.concatenate([{x} @ {a}, {x} @ {b}], axis=-1)", "({x} @ {a}) * ({x} @ {b}).sum()"]
        ).format(x=x, a=w1, b=w2))
    w = g.operand((s[-1], n), d)
    return g.pick([f"{x} @ {w}", f"{x} @ {w}", f"jnp.matmul({x}, {w}, precision='highest')"])


def _conv(g, x, s, d):
    if kind_of(d) != "f" or len(s) not in (3, 4):
        return None
    sp, ks, gr = len(s) - 2, g.pick([1, 2, 3]), g.pick([1, 1, s[1]])
    w = g.operand((g.size() * gr, s[1] // gr) + (ks,) * sp, d)
    return (f"lax.conv_general_dilated({x}, {w}, {(g.pick([1, 1, 2]),) * sp}, "
            f"{g.pick(['SAME', 'VALID', [(1, 0)] * sp])!r}, rhs_dilation={(g.pick([1, 2]),) * sp}, "
            f"feature_group_count={gr})")


def _shape(g, x, s, d):
    form, a = g.pick(UN["shape"]), g.axis(s)
    y = (g.match(s, d) if g.rng.random() < 0.5 else g.operand(s[:a] + (g.size(),) + s[a + 1:], d)
         ) if "{y}" in form else None
    return form.format(
        x=x, y=y, a=a, a0=g.rand(max(1, len(s) - 1)), one=s.index(1) if 1 in s else "",
        sl=", ".join(g.pick([":", "1:", ":-1", "::2", "1::2", "0"]) if n > 1 else ":" for n in s),
        pads=tuple((g.pick([-1, 0, 1]) if n > 1 else 0, g.pick([0, 1, 2]), g.rand(2)) for n in s),
        perm=tuple(g.rng.permutation(len(s)).tolist()),
        mode=g.pick(["constant", "edge", "reflect", "wrap"]))


def _index(g, x, s, d):
    a, c, m, b = g.axis(s), g.rand(7), g.size(), kind_of(d) == "b"
    idx = lambda shape, hi: g.operand(shape, "int32", hi=hi)  # noqa: E731
    if c == 0:
        mode = g.pick(["clip", "fill", "wrap"])
        return f"jnp.take({x}, {idx((m,), s[a] + 1)}, axis={a}, mode={mode!r})"
    if c == 1:
        return f"jnp.take_along_axis({x}, {idx(s[:-1] + (m,), s[-1])}, axis=-1)"
    if c == 2:
        return f"{x}[{idx((m, 2), s[0])}]"
    if c == 3 and not b:
        how = g.pick(["add", "add", "max", "min"])
        return f"{x}.at[{idx((m,), s[0])}].{how}({g.operand((m,) + s[1:], d)})"
    if c == 4 and not b:
        return f"jax.ops.segment_sum({x}, {idx(s[:1], 3)}, num_segments=3)"
    if c == 5:
        i, u = idx((), s[a]), g.operand(s[:a] + (1,) + s[a + 1:], d)
        return g.pick([f"lax.dynamic_slice_in_dim({x}, {i}, 1, axis={a})",
                       f"lax.dynamic_update_slice_in_dim({x}, {u}, {i}, axis={a})"])
    return f"jax.nn.one_hot({x} % 4, 4)" if kind_of(d) in "iu" and len(s) <= 2 else None


def _cumulative(g, x, s, d):
    form = g.pick(UN["cum"] + UN["cum f"] * (kind_of(d) == "f"))
    y = g.match(s, g.pick([d, "int32", "float32"])) if "{y}" in form else None
    if kind_of(d) == "b" and "lax." in form:
        return None
    return form.format(x=x, y=y, a=g.axis(s), r=g.pick([False, True]), k=min(2, s[-1]))


def _fusion(g, x, s, d):
    c, n, w = g.rand(3), g.size(), lambda *shape: g.operand(shape, d)
    if kind_of(d) != "f" or not s:
        return None
    if c == 0 and len(s) == 3:
        return (f"attention({x}, {x} @ {w(s[-1], s[-1])}, {x} @ {w(s[-1], s[-1])}, "
                f"causal={g.pick([True, False])}{g.pick(['', ', fill=-jnp.inf', ', fill=-1.0'])})")
    if c == 1:
        return f"bn_affine({x} @ {w(s[-1], n)}, {', '.join(w(n) for _ in range(4))})"
    v = g.pick([4, 6, 8])
    return f"xent({x}, {w(s[-1], v)}, {g.operand(s[:-1], 'int32', hi=v)})"


OPS = [(_elementwise, 8), (_reduce, 2.5), (_dot, 3), (_conv, 1), (_shape, 3), (_index, 2),
       (_cumulative, 1.5), (_fusion, 1.5)]
# A step in "model" mode keeps the batch axis first (what micro-batches can split).
MODEL_OPS = [(_elementwise, 8), (_reduce, 1.5), (_dot, 4), (_conv, 1), (_fusion, 1.5)]


# ------------------------------------------------------------------------- generator
class Gen:
    """Draws one program from ``rng``: a function (``kind="fn"``) or a training step."""

    def __init__(self, rng, kind: str, x64: bool):
        self.rng, self.kind, self.x64, self.n = rng, kind, x64, 0
        self.inputs, self.types, self.taint = [], {}, set()  # taint: depends on a parameter
        self.floats = ["float32"] * 6 + ["bfloat16", "float16"] + ["float64"] * 5 * x64
        self.scope, self.closure, self.model, self.b = [], True, False, None

    def rand(self, n):
        return int(self.rng.integers(n))

    def pick(self, seq):
        return seq[self.rand(len(seq))]

    def size(self):
        return self.pick([1, 2, 2, 3, 3, 4, 5])

    def axis(self, s):
        return self.rand(len(s)) if s else None

    def dtype(self, k):
        return {"f": self.pick(self.floats), "b": "bool", "u": self.pick(["uint8", "uint32"]),
                "i": self.pick(["int32", "int8"] + ["int64"] * self.x64)}[k]

    def name(self, p="v"):
        self.n += 1
        while f"{p}{self.n}" in self.types:  # a step's batch inputs are d0, d1, ... already
            self.n += 1
        return f"{p}{self.n}"

    def eval(self, expr):
        """(shape, dtype) of ``expr`` over the values in scope (JAX decides)."""
        names = sorted(set(NAME.findall(expr)))
        out = jax.eval_shape(eval(f"lambda {', '.join(names)}: {expr}", dict(NAMESPACE)),
                             *[jax.ShapeDtypeStruct(*self.types[n]) for n in names])
        return tuple(out.shape), str(out.dtype)

    def operand(self, shape, dtype, hi=None):
        """A fresh input where the top level is in reach (a step's: float parameters, and
        per-example integers in model mode), else a constant."""
        shape, k = tuple(int(n) for n in shape), kind_of(dtype)
        role = "arg" if self.kind == "fn" else "batch" if (
            self.model and shape[:1] == (self.b,) and (hi is not None or k != "f")) else "param"
        if self.closure and self.rand(7) > 0 and (role != "param" or hi is None and k == "f"):
            name = self.name({"param": "w", "batch": "d"}.get(role, "x"))
            self.inputs.append(Input(name, shape, dtype, role, hi))
            self.types[name] = (shape, dtype)
            self.taint |= {name} if role == "param" else set()
            return name
        vals = (self.rng.integers(0, hi, shape) if hi is not None else self.rng.random(shape) < 0.5
                if k == "b" else self.rng.integers(0, 5, shape) if k in "iu"
                else np.round(self.rng.standard_normal(shape), 1))
        return f"jnp.array({vals.tolist()}, jnp.{dtype})"

    def match(self, shape, dtype):
        same = [n for n in self.scope if self.types[n] == (tuple(shape), dtype)]
        if same and self.rng.random() < 0.6:
            return self.pick(same)
        return self.operand(shape[1:] if self.model else shape, dtype)  # model: broadcast

    def primary(self, pred=lambda n: True):
        cands = [n for n in self.scope if pred(n)]  # recent values first
        return cands[max(0, len(cands) - int(self.rng.geometric(0.35)))] if cands else None

    def add(self, stmt, types):
        for o, t in zip(stmt.outs, types):
            self.types[o] = t
            self.scope.append(o)
        self.taint |= set(stmt.outs) if self.taint & stmt.uses() else set()
        return stmt

    def op(self, x=None, fn=None):
        ops = [f for f, w in (MODEL_OPS if self.model else OPS) for _ in range(int(w * 2))]
        for _ in range(6):
            xx, n_in = x or self.primary(), len(self.inputs)
            try:
                expr = (fn or self.pick(ops))(self, xx, *self.types[xx])
                t = self.eval(expr) if expr else None
            except Exception:
                t = None
            if t is not None and 0 < int(np.prod(t[0])) <= 512 and len(t[0]) <= 4:
                return self.add(Stmt([self.name()], "op", expr), [t])
            del self.inputs[n_in:]
        return None

    def body(self, n_ops, depth):
        out = []
        for _ in range(n_ops):
            r = self.rng.random()
            out += (self.block(depth) if depth < 3 and r < 0.15 - 0.07 * self.model else
                    self.rnn() if r < 0.2 else [self.op()])
        return [s for s in out if s is not None]

    def block(self, depth):
        kind, types = self.pick(("custom_jvp",) if self.model else BLOCKS), self.types
        pool = ([n for n in self.scope if kind_of(types[n][1]) == "f"] if kind.startswith("custom")
                else [n for n in self.scope if n not in self.taint] if kind == "while"
                else list(self.scope))  # a while loop is not reverse-differentiable
        xs = [n for n in pool if types[n][0]]
        if not pool or (kind == "scan" and not xs):
            return [self.op()]
        ins = sorted({self.pick(pool) for _ in range(1 + self.rand(3))}, key=self.scope.index)
        pre, policy = [], self.pick([None, "dots_saveable", "nothing_saveable"])
        attrs = {"trips": 1 + self.rand(3), "reverse": self.rand(2) == 1,
                 "policy": policy and f"jax.checkpoint_policies.{policy}"}
        if kind == "cond":
            pre = [self.op(fn=lambda g, x, s, d: f"jnp.sum({x}) > 0")]
            if pre[0] is None:
                return []
            attrs["pred"] = pre[0].outs[0]
        if kind == "scan":
            ins, attrs["n_carry"] = ins + [self.pick(xs)], len(ins)
        outer, params, closes = self.scope, [self.name("a") for _ in ins], kind in BLOCKS[:4]
        for pn, n in zip(params, ins):
            types[pn] = (types[n][0][1:], types[n][1]) if kind == "scan" and pn == params[-1] \
                else types[n]
            self.taint |= {pn} if n in self.taint else set()
        self.scope, closure = params + outer * closes, self.closure
        self.closure = closure and closes
        body = self.body(1 + self.rand(3), depth + 1)
        local = [n for n in self.scope if n in params or n in {o for s in body for o in s.outs}]
        self.scope, self.closure = outer, closure
        if kind in ("while", "scan"):  # carries keep their types
            ret = [next((m for m in reversed(local) if types[m] == types[p]), p)
                   for p in params[:len(params) - (kind == "scan")]]
            ys = [self.pick(local) for _ in range(self.rand(3))] if kind == "scan" else []
            outs = [types[r] for r in ret] + [((types[ins[-1]][0][0],) + types[y][0], types[y][1])
                                              for y in ys]
            ret += ys
        else:
            ok = [m for m in local if kind_of(types[m][1]) == "f" or not kind.startswith("custom")]
            ret = list(dict.fromkeys([ok[-1]] + [self.pick(ok) for _ in range(self.rand(2))]))
            outs = [types[r] for r in ret]
        st = Stmt([self.name() for _ in outs], kind, ins=ins, params=params, body=body, ret=ret,
                  attrs=attrs)
        return pre + [self.add(st, outs)]

    def rnn(self):
        """``lax.scan`` over axis 1 of a [batch, time, features] value (an RNN layer), the
        hidden state starting from the first time step (a carry that is not zeros)."""
        x = self.primary(lambda n: len(self.types[n][0]) == 3 and kind_of(self.types[n][1]) == "f")
        if x is None:
            return [self.op()]
        (b, t, f), d = self.types[x]
        h, a_h, a_x = self.size() + 1, self.name("a"), self.name("a")
        init = self.op(x=x, fn=lambda g, x, s, _: f"jnp.tanh({x}[:, 0] @ {g.operand((f, h), d)})")
        xs = self.op(x=x, fn=lambda g, x, s, _: f"jnp.swapaxes({x}, 0, 1)")
        if init is None or xs is None:
            return [init, xs]
        self.types.update({a_h: ((b, h), d), a_x: ((b, f), d)})
        outer, self.scope = self.scope, [a_h, a_x] + self.scope
        cell = self.op(x=a_x, fn=lambda g, x, s, _: f"jnp.tanh({x} @ {g.operand((f, h), d)} + "
                                                      f"{a_h} @ {g.operand((h, h), d)})")
        self.scope = outer
        if cell is None or self.types[cell.outs[0]] != ((b, h), d):
            return [init, xs]
        st = Stmt([self.name(), self.name()], "scan", ins=[init.outs[0], xs.outs[0]],
                  params=[a_h, a_x], body=[cell], ret=cell.outs * 2,
                  attrs={"n_carry": 1, "reverse": self.rand(4) == 0})
        out = [init, xs, self.add(st, [((b, h), d), ((t, b, h), d)])]
        if self.model:  # the batch axis first again, for micro-batches
            out.append(self.op(x=st.outs[1], fn=lambda g, x, s, _: f"jnp.swapaxes({x}, 0, 1)"))
            self.scope = [n for n in self.scope if n not in (xs.outs[0], st.outs[1])]
        return out

    def fn(self) -> Program:
        for _ in range(1 + self.rand(3)):
            shape = tuple(self.size() for _ in range(self.pick([0, 1, 2, 2, 2, 3, 3, 4])))
            self.inputs.append(Input(self.name("x"), shape, self.dtype(self.pick("fffffiubu"))))
            self.types[self.inputs[-1].name] = (shape, self.inputs[-1].dtype)
        self.scope = [i.name for i in self.inputs]
        body = self.body(2 + self.rand(7), 0)
        outs = [self.scope[-1]] + [self.pick(self.scope) for _ in range(self.rand(4))]
        return Program("fn", self.inputs, body, list(dict.fromkeys(outs)), self.x64)

    def step(self) -> Program:
        b = self.pick([2, 3, 4, 4, 6])
        main = self.pick([(b, self.size() + 1), (b, 3, self.size()), (b, 2, 4, 4), (b, 3, 5)])
        batch = [Input("d0", main, self.pick(self.floats[:7] + self.floats[8:]), "batch")]  # no f16
        for k in self.rng.permutation(list("ibuf"))[: self.rand(4)]:
            batch.append(Input(f"d{len(batch)}", (b,) + main[1:self.rand(len(main))],
                               self.dtype(k), "batch", 4 if k == "i" else None))
        self.inputs, self.model, self.b = list(batch), self.rng.random() < 0.75, b
        self.types = {i.name: (i.shape, i.dtype) for i in batch}
        self.scope = [i.name for i in batch]
        body = [self.op(x="d0", fn=_conv if len(main) == 4 else _dot)]
        body += self.body(2 + self.rand(7), 0)
        tainted = lambda n: n in self.taint and kind_of(self.types[n][1]) == "f"  # noqa: E731
        if self.rng.random() < 0.4 and self.primary(tainted):  # batch norm, batch statistics
            body.append(self.op(x=self.primary(tainted), fn=lambda g, x, s, d:
                                f"({x} - {x}.mean(0)) * lax.rsqrt({x}.var(0) + 1e-5)"))
        terms = []
        for _ in range(1 + self.rand(3)):
            x = self.primary(tainted)
            across = x is not None and self.types[x][0][:1] == (b,)  # terms across the batch
            form = self.pick(["jnp.mean({x} ** 2)", "jnp.mean({x})", "jnp.mean(jnp.abs({x}))"] + [
                "jnp.max({x}, axis=0).sum()", "jnp.min({x}, axis=0).mean()",
                "jnp.sum(jax.nn.softmax({x}, axis=0) * {x})"] * across)
            terms.append(x and self.op(x=x, fn=lambda g, x, s, d: form.format(x=x)))
        terms = [t for t in terms if t]
        loss = self.op(x=terms[0].outs[0], fn=lambda g, x, s, d: " + ".join(
            f"{t.outs[0]}.astype(jnp.float32)" for t in terms))
        aux = [self.op(x=self.pick(self.scope), fn=lambda g, x, s, d: g.pick(
            ["{x}", "jnp.max({x}, axis=0)", "jnp.min({x}, axis=0)", "jnp.sum({x}, axis=0)"]
            + ["jnp.argmax({x}, axis=-1)"] * (len(s) > 1) if s else ["{x}"]).format(x=x))
            for _ in range(self.rand(4))]
        return Program("step", sorted(self.inputs, key=lambda i: i.role != "param"),
                       [t for t in body + terms + [loss] + aux if t],
                       [loss.outs[0]] + [a.outs[0] for a in aux if a], self.x64)


def generate(seed, kind: str | None = None, x64: bool | None = None) -> Program:
    """One random program from ``seed``: a function or a step, float64 in one draw in seven."""
    rng = np.random.default_rng(seed)
    kind = kind or ("step" if rng.random() < 0.4 else "fn")
    x64 = bool(rng.random() < 0.15) if x64 is None else x64
    with jax.enable_x64(x64):
        prog = getattr(Gen(rng, kind, x64), kind)()
    prog.label = f"seed {seed}"
    return prog


__all__ = ["Gen", "generate", "OPS", "MODEL_OPS", "UN", "FORMS"]
