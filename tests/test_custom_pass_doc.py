"""docs/write_your_own_pass.md and docs/design.md run as written: their python blocks are
executed in order."""
import pathlib
import re

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
DOC = DOCS / "write_your_own_pass.md"


def _run_blocks(doc: pathlib.Path, at_least: int) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= at_least, f"{doc.name} lost its code blocks"
    ns: dict = {"__name__": doc.stem}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{doc.name}[block {i}]", "exec"), ns)  # noqa: S102 - our own doc
    return ns


def test_design_doc_code_runs():
    ns = _run_blocks(DOCS / "design.md", at_least=3)
    # what the walkthrough claims, checked again so a silent edit cannot weaken it
    assert ns["res"].changed and ns["res3"].stats.hits["pow_to_mul.integer_pow"] == 3
    assert ns["report"].passes[-1] == "pow_to_mul"


def test_tutorial_code_runs():
    ns = _run_blocks(DOC, at_least=4)
    # what the tutorial claims, checked again here so a silent edit cannot weaken it
    assert ns["pows"] == [3]
    assert ns["report"].hits()["square_to_mul.integer_pow"] == 2
    assert ns["result"].changed
