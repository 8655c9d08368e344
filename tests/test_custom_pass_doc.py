"""docs/write_your_own_pass.md runs as written: its python blocks are executed in order."""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "write_your_own_pass.md"


def test_tutorial_code_runs():
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4, "the tutorial lost its code blocks"
    ns: dict = {"__name__": "write_your_own_pass"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), ns)  # noqa: S102 - our own doc
    # what the tutorial claims, checked again here so a silent edit cannot weaken it
    assert ns["pows"] == [3]
    assert ns["report"].hits()["square_to_mul.integer_pow"] == 2
    assert ns["result"].changed
