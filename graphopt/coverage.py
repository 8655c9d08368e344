"""Primitive coverage: for every JAX primitive, what each pass family does with it.

:func:`coverage_table` reads the decisions from the families' own rule tables (prune's
``FOLD``/``CSE``/``SIMPLIFY`` rule tables and ``DCE_RULES``, the fusion rules' root
primitives, ``remat.plan.NO_RECOMPUTE``, ``remat.batch.RULES``, the cost model's
``FLOP_RULES``) and from graphopt's own per-equation predicates (``ir.impure``,
``ir.has_subjaxprs``), applied to equations of small probe programs where a primitive's
traits (effects, sub-jaxprs) belong to its equations rather than to its name.
:func:`write_docs` renders ``docs/coverage.md``, one section per JAX version::

    python -c "import graphopt.coverage as c; c.write_docs('docs/coverage.md')"
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import jax

from . import ir
from .errors import GraphoptError

REWRITE, PASS, REFUSE = "rewrite", "pass through", "refuse"
DECISIONS = (REWRITE, PASS, REFUSE)
FAMILIES = ("dce", "fold", "cse", "simplify", "fuse", "remat keep", "remat micro-batches")

MEANING = {
    REWRITE: "the family has a rule for this primitive: its equations may be removed, "
             "folded, merged, simplified, fused (as a pattern's root), recomputed or split "
             "into micro-batches, when the rule's conditions hold",
    PASS: "equations of this primitive are left exactly as they are (sub-jaxprs are "
          "still rewritten inside) and the family goes on with the rest of the program",
    REFUSE: "the family gives up on the whole program when an equation of this primitive "
            "is in its way (micro-batches: when it reads a value that depends on the batch; "
            "an equation that reads only weights runs once, as is)",
}
FAMILY_DOC = {
    "dce": "prune `dce`: drops equations nobody reads (and unused outputs/carries)",
    "fold": "prune `fold`: evaluates equations whose inputs are all constants",
    "cse": "prune `cse`: merges equations with the same primitive, params and inputs",
    "simplify": "prune `simplify`: exact algebraic identities (`SIMPLIFY` rule table)",
    "fuse": "the fusion passes (attention, batch norm, parallel dots, matmul chain, "
            "cross-entropy): a primitive is rewritten when it is a fusion rule's root; "
            "`graphopt.rewrite` rules are the user's and not listed",
    "remat keep": "`remat`, choosing what to keep: which primitives may be recomputed",
    "remat micro-batches": "`remat`, micro-batches (`remat.batch.RULES`): which "
                           "primitives may be split along the batch",
}


class CoverageError(GraphoptError):
    """A primitive has no decision for some family (the message lists them)."""


@dataclasses.dataclass(frozen=True)
class Traits:
    """What graphopt's per-equation predicates say about a primitive's equations."""
    known: bool = True        # in ir.known_primitives()
    random: bool = False      # ir.RANDOM_PRIMITIVES
    effects: bool = False     # its own equations carry an effect (ir.effectful)
    subjaxprs: bool = False   # ir.has_subjaxprs on its equations

    @property
    def impure(self) -> bool:
        return self.random or self.effects


# ------------------------------------------------------------------ probe programs

def _probe_programs() -> dict:
    """Small programs whose equations show, per primitive, the traits graphopt tests per
    equation (effects, sub-jaxprs); primitives no probe shows are taken as first-order and
    effect-free, as graphopt's name-keyed tables do."""
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import io_callback
    spec = jax.ShapeDtypeStruct((4, 3), jnp.float32)

    @jax.custom_jvp
    def cjvp(v):
        return jnp.sin(v)
    cjvp.defjvp(lambda p, t: (cjvp(p[0]), t[0]))

    @jax.custom_vjp
    def cvjp(v):
        return jnp.sin(v)
    cvjp.defvjp(lambda v: (cvjp(v), v), lambda r, g: (g,))

    from jax import custom_batching

    @custom_batching.custom_vmap
    def cvmap(v):
        return jnp.sin(v)
    cvmap.def_vmap(lambda n, ib, v: (jnp.sin(v), ib[0]))

    progs = {
        "jax.debug.callback": lambda v: (jax.debug.callback(lambda a: None, v), v)[1],
        "jax.debug.print": lambda v: (jax.debug.print("{}", v), v)[1],
        "io_callback": lambda v: io_callback(lambda a: a, spec, v),
        "io_callback ordered": lambda v: io_callback(lambda a: a, spec, v, ordered=True),
        "pure_callback": lambda v: jax.pure_callback(lambda a: a, spec, v),
        "lax.cond": lambda v: lax.cond(v.sum() > 0, jnp.sin, jnp.cos, v),
        "lax.scan": lambda v: lax.scan(lambda c, r: (c + r, r), v[0], v)[0],
        "lax.while_loop": lambda v: lax.while_loop(lambda c: c.sum() < 9, lambda c: c + 1, v),
        "jax.jit": lambda v: jax.jit(jnp.sin)(v),
        "jax.checkpoint": lambda v: jax.checkpoint(jnp.sin)(v),
        "custom_jvp/vjp/vmap": lambda v: cjvp(v) + cvjp(v) + cvmap(v),
        "custom_linear_solve": lambda v: lax.custom_linear_solve(lambda y: y, v, lambda m, b: b),
        "scatters": lambda v: v.at[0].add(1.0).at[1].set(2.0).at[2].mul(3.0).at[3].max(1.0)
                               .at[0].min(0.0),
        "reductions": lambda v: (lax.reduce(v, 0.0, lambda a, b: a + b * b, (0,)),
                                 jnp.argmax(v, 0), lax.sort(v), jnp.cumsum(v, 0),
                                 lax.reduce_window(v, 1.0, lax.mul, (2, 1), (1, 1), "VALID")),
        "jax.random": lambda v: jax.random.normal(jax.random.key(0), (3,)),
    }
    if hasattr(lax, "composite"):
        progs["lax.composite"] = lambda v: lax.composite(jnp.sin, name="graphopt.probe")(v)
    return {k: (f, spec) for k, f in progs.items()}


@functools.lru_cache(maxsize=1)
def probed_traits() -> dict[str, Traits]:
    """{primitive: Traits} for the primitives the probe programs show."""
    seen: dict[str, Traits] = {}
    for _, (fn, spec) in _probe_programs().items():
        for e, _, _ in ir.walk_eqns(jax.make_jaxpr(fn)(spec)):
            name = e.primitive.name
            subs = ir.has_subjaxprs(e)
            prev = seen.get(name, Traits(random=name in ir.RANDOM_PRIMITIVES))
            # a higher-order equation carries its body's effects; only first-order ones own theirs
            seen[name] = dataclasses.replace(prev, subjaxprs=prev.subjaxprs or subs,
                                             effects=prev.effects or (ir.effectful(e) and not subs))
    return seen


def traits(name: str) -> Traits:
    known = name in ir.known_primitives()
    got = probed_traits().get(name)
    if got is not None:
        return dataclasses.replace(got, known=known)
    return Traits(known=known, random=name in ir.RANDOM_PRIMITIVES)


# ------------------------------------------------------------------ the decisions

def _prune():
    from graphopt.transforms import prune
    return prune


def _dce(p: str, t: Traits) -> str | None:
    # ir.removable_if_dead: never effects, RNG or unknown primitives; DCE_RULES prune outputs
    if not t.known or t.impure:
        return PASS
    return REWRITE


def _table_default(table, decide):
    """Decision of a RuleTable's default rule, or None if coverage.py does not know it."""
    prune = _prune()
    from graphopt.interpreter import keep
    # the defaults whose behaviour ``decide`` describes; any other default is undecided
    known_defaults = {keep: lambda: PASS, prune._fold_default: decide,
                      prune._cse_default: decide}
    fn = known_defaults.get(table.default)
    return None if fn is None else fn()


def _prune_table(table: str, default):
    """Decisions of the rewriting interpreter's rule table ``prune.<table>``: unknown
    primitives pass through, a primitive with a rule is rewritten, any other follows the
    table's default (``default(p, t)`` describes it; see :func:`_table_default`)."""
    def decide(p: str, t: Traits) -> str | None:
        rules = getattr(_prune(), table)
        if not t.known:
            return PASS
        if p in rules:
            return REWRITE
        return _table_default(rules, lambda: default(p, t))
    return decide


# prune._fold_default: never impure, higher-order or axis-dependent equations
_fold = _prune_table("FOLD", lambda p, t: PASS if (
    t.impure or t.subjaxprs or p in _prune()._AXIS_DEPENDENT) else REWRITE)
_cse = _prune_table("CSE", lambda p, t: PASS if t.impure else REWRITE)  # prune._cse_default
_simplify = _prune_table("SIMPLIFY", lambda p, t: PASS)


def fusion_roots() -> frozenset | None:
    """Root primitives of every built-in fusion rule (None: a rule matches anywhere)."""
    from graphopt.transforms import fuse_attention, fuse_batchnorm, fuse_dots, fuse_xent
    roots: set = set()
    for rule in (fuse_attention.RULES + fuse_attention.RULES_WHERE_IT_PAYS + fuse_batchnorm.RULES
                 + fuse_dots.PARALLEL_RULES + fuse_dots.CHAIN_RULES + fuse_xent.RULES):
        if rule.roots is None:
            return None
        roots |= rule.roots
    return frozenset(roots)


def _fuse(p: str, t: Traits) -> str | None:
    roots = fusion_roots()
    if not t.known or t.impure:  # patterns_apply._check_private: a match never swallows effects
        return PASS
    return REWRITE if roots is None or p in roots else PASS


def _remat_keep(p: str, t: Traits) -> str | None:
    from graphopt.transforms.remat import plan as remat_plan
    # remat_plan.recomputable: pure, known, not NO_RECOMPUTE; others stay saved
    if not t.known or t.impure or p in remat_plan.NO_RECOMPUTE:
        return PASS
    return REWRITE


def _remat_micro(p: str, t: Traits) -> str | None:
    from graphopt.transforms.remat import batch as remat_batch
    if t.effects:
        return REFUSE  # remat_batch.analyse: loops would reorder the effect
    if t.random:
        return REFUSE  # remat_batch._classify: random equations never read a batched value
    if p in remat_batch.RULES or p in remat_batch._CALLS:  # _CALLS are inlined, then split
        return REWRITE
    return REFUSE  # no batch rule: Unstreamable when it reads a batched value


CLASSIFIERS = {"dce": _dce, "fold": _fold, "cse": _cse, "simplify": _simplify,
               "fuse": _fuse, "remat keep": _remat_keep, "remat micro-batches": _remat_micro}


def jax_primitives() -> list[str]:
    """The primitives the table covers: ``ir.known_primitives()``, sorted."""
    return sorted(ir.known_primitives())


def decisions(name: str, t: Traits | None = None) -> dict[str, str | None]:
    t = traits(name) if t is None else t
    return {fam: CLASSIFIERS[fam](name, t) for fam in FAMILIES}


def undecided(names=None) -> list[tuple[str, str]]:
    """(primitive, family) pairs that no rule table or explicit default decides."""
    names = jax_primitives() if names is None else names
    return [(p, fam) for p in names for fam, d in decisions(p).items() if d not in DECISIONS]


def coverage_table(names=None) -> dict[str, dict[str, str]]:
    """{primitive: {family: "rewrite" | "pass through" | "refuse"}} for every primitive."""
    names = jax_primitives() if names is None else names
    gaps = undecided(names)
    if gaps:
        raise CoverageError(
            f"{len(gaps)} (primitive, family) pairs have no decision, e.g. {gaps[:5]}: give "
            "the family's rule table a rule or an explicit default that graphopt/coverage.py "
            "maps to 'rewrite', 'pass through' or 'refuse'")
    return {p: decisions(p) for p in names}


def flop_pricing(name: str) -> str:
    """How the cost model (which prices recomputation) counts the primitive's FLOPs."""
    from graphopt import cost
    if name in cost.FLOP_RULES:
        return "FLOP rule"
    if traits(name).subjaxprs and name not in cost.COMBINER_PRIMITIVES:
        return "its sub-jaxprs"
    return "default guess"


# ------------------------------------------------------------------ the document

SECTION_RE = re.compile(r"^## JAX (\S+)\n", re.M)
HEADER = "# Primitive coverage\n"


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def render_preface() -> str:
    """The version-independent part of docs/coverage.md."""
    lines = [HEADER, "<!-- generated by graphopt.coverage.write_docs; do not edit by hand: "
             "python -c \"import graphopt.coverage as c; c.write_docs('docs/coverage.md')\" -->",
             "", "What each pass family does with each primitive JAX defines (the names in "
             "JAX's lowering tables, `graphopt.ir.known_primitives()`). The decisions are read "
             "from the families' own rule tables by `graphopt/coverage.py`, never written by "
             "hand; each JAX version has its own section, regenerated under that version.", "",
             "Words:", ""]
    lines += [f"- **{w}**: {MEANING[w]}." for w in DECISIONS]
    lines += ["", "Families:", ""] + [f"- **{f}**: {FAMILY_DOC[f]}." for f in FAMILIES]
    lines += ["", "*cost model* says how `graphopt.cost` prices the primitive when remat "
              "weighs a recomputation: its own FLOP rule, its sub-jaxprs, or the default guess "
              "of one FLOP per output element.", "",
              "## Per equation, whatever the primitive", "",
              "Effects belong to equations, not primitives: these rows override the tables "
              "below (a random primitive is listed by name in each section).", "",
              _row(["equation"] + list(FAMILIES)), _row(["---"] * (len(FAMILIES) + 1))]
    for what, t in (("carries an effect (`jax.debug.print`, callbacks, ordered IO)",
                     Traits(effects=True)),
                    ("primitive graphopt does not know (neither JAX's nor registered)",
                     Traits(known=False))):
        lines.append(_row([what] + [str(d) for d in decisions("<equation>", t).values()]))
    lines += ["", "A higher-order equation whose sub-jaxpr holds an unknown primitive is "
              "never dropped or recomputed either (`ir.removable_if_dead`, "
              "`remat.plan.recomputable`).", ""]
    return "\n".join(lines)


def render_section(version: str | None = None) -> str:
    """The section of the running JAX version: one row per primitive."""
    version = version or jax.__version__
    table = coverage_table()
    probed = {p: t for p, t in probed_traits().items() if p in table}

    def names(pred):
        return ", ".join(f"`{p}`" for p in sorted(probed) if pred(probed[p])) or "none"
    lines = [f"## JAX {version}", "",
             f"{len(table)} primitives. Read from probe equations: effects of their own "
             f"for {names(lambda t: t.effects)}; sub-jaxprs for "
             f"{names(lambda t: t.subjaxprs)}.", "",
             _row(["primitive"] + list(FAMILIES) + ["cost model"]),
             _row(["---"] * (len(FAMILIES) + 2))]
    for p, row in table.items():
        lines.append(_row([f"`{p}`"] + [row[f] for f in FAMILIES] + [flop_pricing(p)]))
    return "\n".join(lines) + "\n"


def _version_key(v: str):
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.+-]", v))


def read_sections(text: str) -> tuple[str, dict[str, str]]:
    """(preface, {JAX version: section text}) of a coverage document."""
    marks = list(SECTION_RE.finditer(text))
    preface = text[:marks[0].start()] if marks else text
    sections = {}
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        sections[m.group(1)] = text[m.start():end].rstrip("\n") + "\n"
    return preface, sections


def render_docs(existing: str = "") -> str:
    """The whole document: this version's section replaced, other versions' kept."""
    _, sections = read_sections(existing)
    sections[jax.__version__] = render_section()
    body = "\n".join(sections[v] for v in sorted(sections, key=_version_key))
    return render_preface() + "\n" + body


def stale(text: str) -> str | None:
    """Why ``text`` (a coverage document) is stale for the running JAX version, or None;
    raises LookupError when it has no section for this version."""
    preface, sections = read_sections(text)
    if preface != render_preface() + "\n":
        return "its preface differs from render_preface()"
    if jax.__version__ not in sections:
        raise LookupError(f"no section for JAX {jax.__version__} (has {sorted(sections)})")
    if sections[jax.__version__] != render_section():
        return f"its JAX {jax.__version__} section differs from render_section()"
    return None


def write_docs(path: str | Path = "docs/coverage.md") -> Path:
    """Regenerate ``path`` for the running JAX version (other versions' sections stay)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    path.write_text(render_docs(old))
    return path


__all__ = ["coverage_table", "write_docs", "render_docs", "render_section", "render_preface",
           "read_sections", "stale", "undecided", "decisions", "traits", "probed_traits",
           "fusion_roots", "flop_pricing", "Traits", "CoverageError", "FAMILIES", "DECISIONS"]
