"""graphopt's own exceptions: each message says what went wrong and where."""


class GraphoptError(Exception):
    """Base class of graphopt's errors."""


class PassError(GraphoptError):
    """A pass failed or broke an invariant; the message names the pass."""


class RewriteError(GraphoptError):
    """A rule failed on an equation; the message names the rule table, primitive and line."""


class EquivalenceError(GraphoptError):
    """The optimized function's outputs or gradients differ from the original's."""


class OptionError(GraphoptError, TypeError, ValueError):
    """An option graphopt does not know, or a value it cannot read; names the valid ones."""


class BudgetError(GraphoptError, ValueError):
    """The memory budget is below what rematerialization can reach.

    ``budget_bytes``, ``floor_bytes`` (the smallest feasible budget found) and
    ``base_bytes`` (the program without remat) say by how much, where known."""

    def __init__(self, message: str, *, budget_bytes: int | None = None,
                 floor_bytes: int | None = None, base_bytes: int | None = None):
        super().__init__(message)
        self.budget_bytes, self.floor_bytes, self.base_bytes = budget_bytes, floor_bytes, base_bytes


class MissingExtraError(GraphoptError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, what: str):
    """Import ``module`` for ``what``, or raise :class:`MissingExtraError` naming the extra."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs the Python package {module.split('.')[0]!r}, which is not installed: "
            f'pip install "graphopt[{extra}]"') from exc
