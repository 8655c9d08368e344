"""A small pattern matcher and rewrite engine over jaxpr dataflow.

Patterns are trees (:func:`op`, :func:`wild`, :func:`lit`). Matching follows producers, never variable names:
``op("mul", wild("x"), lit())`` matches ``b = mul 2.0 a`` as well as ``b = mul a 2.0``
(commutative primitives try both operand orders), a name bound twice must bind the same
value, and calls to ``jit`` are looked through (each jaxpr level is matched on a view in
which ``jit`` bodies are inlined).

A :class:`Rule` finds a :class:`Match` rooted at one equation and returns replacement
equations (a function traced on the matched atoms) or ``None`` for "no match".
:func:`apply_rules` applies rules to every level of a program, sub-jaxprs included.

A match is replaced only when the values it computes internally are read nowhere else
(else the original equations would have to stay and nothing is saved) and it holds no
effectful or random equation; :func:`apply_rules` says so in the stats when it skips one.

Users add their own fusions with :func:`rewrite` (like ``torch.fx``'s
``replace_pattern``); the ``user_rewrites`` pass of ``graphopt.transforms.fuse`` applies
every registered one.

This module is the public face; the code lives in ``patterns_match`` (trees, views,
matching), ``patterns_apply`` (rules, applying them) and ``patterns_user`` (user rules),
which import each other in that order only.
"""
from __future__ import annotations

from .primitives import COMMUTATIVE
from .patterns_match import (Bindings, Lit, Op, Pat, View, Wild, inline_jits, is_fused_call, lit,
                             match, op, wild)
from .patterns_apply import DotRule, Match, Rule, apply_rules
from .patterns_user import LitArg, PatternRule, clear_user_rules, rewrite, unregister, user_rules

__all__ = ["Pat", "Wild", "Lit", "Op", "wild", "lit", "op", "View", "Bindings", "match", "Match",
           "Rule", "DotRule", "PatternRule", "LitArg", "apply_rules", "inline_jits", "rewrite", "user_rules",
           "clear_user_rules", "unregister", "COMMUTATIVE", "is_fused_call"]
