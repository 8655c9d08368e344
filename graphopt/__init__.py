"""graphopt: graph transformations for JAX programs.

Trace a function into a jaxpr, rewrite it with passes (pruning, fusion,
rematerialization, ...), run the result through XLA. Start with :func:`optimize`.
"""
from . import ir
from .errors import EquivalenceError, GraphoptError, PassError, RewriteError
from .interpreter import RuleTable, Rewriter, Stats, rewrite
from .passes import Pass, PassContext, PassResult, Pipeline, register_pass, registered_passes
from .api import Optimized, default_passes, optimize, optimize_jaxpr
from .report import Report
from . import analysis, testing

__version__ = "0.1.0"

__all__ = ["optimize", "Optimized", "optimize_jaxpr", "default_passes", "Pass", "PassResult",
           "PassContext", "Pipeline", "RuleTable", "Rewriter", "Stats", "rewrite", "register_pass",
           "registered_passes", "Report", "GraphoptError", "PassError", "RewriteError",
           "EquivalenceError", "ir", "analysis", "testing"]
