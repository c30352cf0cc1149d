"""The README's Python snippet runs as written and prints what it computes (issue 15)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippet_runs_and_prints():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "expected one Python snippet in README.md"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    printed = out.getvalue()
    for label in ("W1(x0, x1):", "feasible:", "exact: certified", "attack:", "minimal:"):
        assert label in printed, (label, printed)
    assert "True" in printed.split("exact:")[1].splitlines()[0]  # exact on the linear net
