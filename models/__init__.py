"""Reference model zoo: small pure-JAX models (pytrees of arrays + optax) to exercise graph transforms.

Every module exposes the same interface: ``SIZES`` (tiny, for unit tests) and
``BENCH_SIZES`` (realistic) keyword dicts, ``init(key, **sizes)``,
``apply(params, x, ...)``, ``loss(params, batch)``, ``example_batch(key, **sizes)``,
``optimizer(learning_rate=1e-3)``, ``init_opt_state(params)``,
``make_train_step(opt)`` and ``train_step(params, opt_state, batch)``.
This package imports neither graphopt nor its transforms.
"""

from . import cnn, gpt, mlp, rnn

ZOO = {"mlp": mlp, "gpt": gpt, "cnn": cnn, "rnn": rnn}

__all__ = ["ZOO", "cnn", "gpt", "mlp", "rnn"]
