"""Execute notebooks in place with nbclient so they are committed with fresh outputs.

    .venv/bin/python notebooks/execute.py [notebooks/NAME.ipynb ...]   (default: all)

Saved outputs are for reading, not watching: progress bars (GRAPHOPT_PROGRESS) and
coloured jaxprs (JAX_PPRINT_USE_COLOR) are off in the kernels, so no carriage-return
fragments or ANSI escape codes end up in the files.
"""
import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
# what a kernel started from here inherits: plain text outputs only
QUIET_ENV = {"GRAPHOPT_PROGRESS": "0", "JAX_PPRINT_USE_COLOR": "0"}


def execute(nb, timeout=600):
    """Run ``nb`` in place in a fresh python3 kernel with QUIET_ENV; returns seconds taken."""
    os.environ.update(QUIET_ENV)
    t0 = time.perf_counter()
    NotebookClient(nb, kernel_name="python3", timeout=timeout,
                   resources={"metadata": {"path": HERE}}).execute()
    return time.perf_counter() - t0


def main(paths):
    for path in paths or sorted(glob.glob(os.path.join(HERE, "*.ipynb"))):
        nb = nbformat.read(path, as_version=4)
        took = execute(nb)
        nbformat.write(nb, path)
        print(f"executed {os.path.relpath(path)} in {took:.0f} s, "
              f"{os.path.getsize(path) / 1e3:.0f} kB")


if __name__ == "__main__":
    main(sys.argv[1:])
