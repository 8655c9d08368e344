"""pytest configuration for the model zoo tests (nothing special: the tests import `graphopt.models`)."""
