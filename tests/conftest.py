"""Every pass's output is type-checked in full during the tests (off by default for users,
as JAX's own jax_enable_checks is); notebook kernels inherit the variable."""
import os

os.environ.setdefault("GRAPHOPT_CHECK_JAXPR", "1")
