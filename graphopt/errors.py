"""graphopt's own exceptions: each message says what went wrong and where."""


class GraphoptError(Exception):
    """Base class of graphopt's errors."""


class PassError(GraphoptError):
    """A pass failed or broke an invariant; the message names the pass."""


class RewriteError(GraphoptError):
    """A rule failed on an equation; the message names the rule table, primitive and line."""


class EquivalenceError(GraphoptError):
    """The optimized function's outputs or gradients differ from the original's."""


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
