"""graphopt: graph transformations for JAX programs.

Trace a function into a jaxpr, rewrite it with passes (pruning, fusion,
rematerialization, ...), run the result through XLA. Start with :func:`optimize`.
"""
from . import ir
from .errors import (BudgetError, EquivalenceError, GraphoptError, MissingExtraError, OptionError,
                     PassError, RewriteError)
from .interpreter import CannotRewrite, RuleTable, Rewriter, Stats
from .passes import Pass, PassContext, PassResult, Pipeline, register_pass, registered_passes
from .api import Optimized, Rematted, default_passes, optimize, optimize_jaxpr, remat
from .report import Report
from . import analysis, testing
from .bisect import BisectResult, bisect, first_differing_pass
from .loss_scaling import loss_scaling  # the function shadows its module's name on purpose

__version__ = "0.1.0"

# Drawing, plotting and pattern APIs load their heavier dependencies on first use.
_LAZY = {
    "draw": ("graphopt.viz", "draw"),
    "diff": ("graphopt.viz_diff", "diff"),
    "memory_timeline": ("graphopt.memory", "memory_timeline"),
    "pareto": ("graphopt.memory", "pareto"),
    "memory_report": ("graphopt.buffers", "memory_report"),
    "rewrite": ("graphopt.patterns", "rewrite"),
    "Precision": ("graphopt.transforms.precision_rules", "Precision"),
    "prune_channels": ("graphopt.transforms.structural", "prune_channels"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")


__all__ = ["optimize", "remat", "Precision", "loss_scaling", "prune_channels", "draw", "diff",
           "memory_timeline", "memory_report", "pareto", "rewrite", "Optimized", "optimize_jaxpr",
           "default_passes", "Pass", "PassResult",
           "PassContext", "Pipeline", "RuleTable", "Rewriter", "Stats", "register_pass",
           "registered_passes", "Report", "GraphoptError", "PassError", "RewriteError",
           "MissingExtraError", "BudgetError", "OptionError", "CannotRewrite", "Rematted",
           "bisect", "first_differing_pass", "BisectResult",
           "EquivalenceError", "ir", "analysis", "testing"]
