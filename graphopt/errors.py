"""graphopt's own exceptions: each message says what went wrong and where."""


class GraphoptError(Exception):
    """Base class of graphopt's errors."""


class PassError(GraphoptError):
    """A pass failed or broke an invariant; the message names the pass."""


class RewriteError(GraphoptError):
    """A rule failed on an equation; the message names the rule table, primitive and line."""


class EquivalenceError(GraphoptError):
    """The optimized function's outputs or gradients differ from the original's."""
