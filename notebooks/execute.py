"""Execute notebooks in place with nbclient so they are committed with fresh outputs.

    .venv/bin/python notebooks/execute.py [notebooks/NAME.ipynb ...]   (default: all)
"""
import glob
import os
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def main(paths):
    for path in paths or sorted(glob.glob(os.path.join(HERE, "*.ipynb"))):
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, kernel_name="python3", timeout=600,
                       resources={"metadata": {"path": HERE}}).execute()
        nbformat.write(nb, path)
        print(f"executed {os.path.relpath(path)}")


if __name__ == "__main__":
    main(sys.argv[1:])
