"""Every ```python example in README.md runs as written (in a fresh interpreter, in a scratch directory).

A block preceded by `<!-- readme-test: continues -->` is appended to the block before it; one preceded by
`<!-- readme-test: skip (reason) -->` is not run, and the reason must name what covers it instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>continues|skip \((?P<reason>[^)]+)\)) -->\n)?```python\n"
                   r"(?P<code>.*?)```", re.S)


def readme_examples() -> list[tuple[str, str]]:
    """(id, code) of each runnable example, continuations joined to what they continue."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    examples: list[list[str]] = []
    for match in BLOCK.finditer(text):
        marker = match["marker"] or ""
        if marker.startswith("skip"):
            assert len(match["reason"]) > 20, f"a skipped README example needs a reason: {match['code'][:80]!r}"
            continue
        line = text.count("\n", 0, match.start("code")) + 1
        if marker == "continues":
            assert examples, "the first README example cannot continue another"
            examples[-1][1] += "\n" + match["code"]
        else:
            examples.append([f"README.md:{line}", match["code"]])
    return [(name, code) for name, code in examples]


EXAMPLES = readme_examples()


def test_the_readme_has_runnable_examples():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_readme_example_runs(name, code, tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
