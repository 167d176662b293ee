"""Every guarantee in the docs names tests that exist: a test renamed or removed cannot
leave a promise behind that nothing checks any more."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["docs/guarantees.md", "docs/shared-state.md"]
#: `tests/test_x.py::name`, or `::name` (in the file named last before it).
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)`")
#: `tests/test_x.py`: every test of that file.
WHOLE_FILE = re.compile(r"`(tests/[\w/]+\.py)`")


def _rows(page: str) -> list[tuple[int, str, str]]:
    """``(line, guarantee, proof)`` of each row of the page's "Proved by" tables."""
    rows = []
    in_table = False
    for number, line in enumerate((ROOT / page).read_text().splitlines(), 1):
        if line.startswith("| Guarantee | Proved by |"):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if in_table and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            assert len(cells) == 2, f"{page}:{number}: a row of two cells expected"
            rows.append((number, cells[0], cells[1]))
    return rows


@pytest.mark.parametrize("page", PAGES)
def test_every_guarantee_names_tests_that_exist(page: str) -> None:
    rows = _rows(page)
    assert len(rows) >= 10, f"{page}: no guarantee table found"
    missing = []
    current = None  # a `::name` refers to the file named last, in this row or above
    for number, guarantee, proof in rows:
        found = REFERENCE.findall(proof)
        files = WHOLE_FILE.findall(proof)
        assert found or files, f"{page}:{number}: no test named for {guarantee!r}"
        for path in files:
            source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
            if not re.search(r"^(async )?def test_\w+\(", source, re.MULTILINE):
                missing.append(f"{page}:{number}: {path} (no such file, or no test in it)")
            current = path
        for path, name in found:
            current = path or current
            assert current, f"{page}:{number}: `::{name}` before any file is named"
            source = (ROOT / current).read_text()
            if not re.search(rf"^(async )?def {name}\(", source, re.MULTILINE):
                missing.append(f"{page}:{number}: {current}::{name}")
    assert not missing, "named in the docs but not defined:\n" + "\n".join(missing)


def test_ci_runs_the_readme_test_commands() -> None:
    """CI runs the one test command the README gives (default run, then slow, then the
    default run on the pure-Python path), as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Install and run the test suite", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 1, commands
    assert "-m pytest &&" in commands[0], commands
    assert "-m pytest -m slow &&" in commands[0], commands
    assert commands[0].endswith("&& AIOSHM_PURE_PYTHON=1 .venv/bin/python -m pytest"), commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert any(line.startswith(command) for line in ci), f".ci/run does not run {command!r}"
