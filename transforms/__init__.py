"""Pass families: one module each. Importing this package registers their passes."""
from . import batch_parallel, fuse, precision, prune, remat

# Passes that join graphopt.optimize's default pipeline after "prune" (families add
# theirs here when they are exact and fire only where their cost model says it pays).
DEFAULT_EXTRA_PASSES: list[str] = list(fuse.DEFAULT_FUSIONS) + ["batch_parallel"]

__all__ = ["prune", "fuse", "precision", "remat", "batch_parallel", "DEFAULT_EXTRA_PASSES"]
