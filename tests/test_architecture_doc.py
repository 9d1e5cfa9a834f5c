"""docs/ARCHITECTURE.md names every module of the three layers, and names no module that does not exist.

Convention: the document names a module by its path relative to the repository root, in backticks, e.g.
`paca_core/outputs.py` or `paca_core/plan/trace.py` (not by dotted name). A package's ``__init__.py`` is
covered either by its own path or by its package's folder in backticks with a trailing slash, e.g.
`paca_core/bench/`.

Every path-like ``something.py`` the document mentions must exist, so a deleted or renamed module cannot
linger: one with a folder (``devices/hpu.py``, ``tests/conftest.py``) relative to the repository root, a
bare file name (``portable.py``) as the name of some file of the repository. Placeholders such as
``paca_core/methods/<name>.py`` are not paths and are skipped.

Stdlib only, reads files only: part of the fast tier.
"""
from __future__ import annotations

import re
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
PACKAGES = ("devices", "backends", "paca_core")
#: Folders whose .py files a bare file name in the document may refer to.
SEARCHED = PACKAGES + ("tests", "scripts", "examples")
#: A path-like mention of a Python file; ``<name>.py`` placeholders never match (``<``/``>`` end a token).
_PY_PATH = re.compile(r"(?<![\w./<>-])([\w][\w./-]*\.py)(?![\w])")


def _modules() -> list[Path]:
    """Every .py file under the three packages, relative to the repository root."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO)
            if "__pycache__" not in relative.parts:
                found.append(relative)
    return found


def _named(text: str, module: Path) -> bool:
    """Whether ``text`` names ``module`` by its whole path (``a/b.py`` inside ``x/a/b.py`` does not count)."""
    if re.search(rf"(?<![\w./-]){re.escape(module.as_posix())}(?!\w)", text):
        return True
    return module.name == "__init__.py" and f"`{module.parent.as_posix()}/`" in text


def _mentioned_py_paths(text: str) -> set[str]:
    return {match.group(1) for match in _PY_PATH.finditer(text)}


def _exists(mention: str) -> bool:
    if "/" in mention:
        return (REPO / mention).is_file()
    return any(any((REPO / folder).rglob(mention)) for folder in SEARCHED if (REPO / folder).is_dir())


class ArchitectureDocTest(unittest.TestCase):
    def setUp(self) -> None:
        self.text = DOC.read_text(encoding="utf-8")

    def test_every_module_is_named(self) -> None:
        modules = _modules()
        self.assertGreater(len(modules), 50)  # it did find the packages
        missing = [m.as_posix() for m in modules if not _named(self.text, m)]
        self.assertEqual(
            missing, [],
            f"docs/ARCHITECTURE.md does not name {missing}: add a row with its path (e.g. `paca_core/outputs.py`) "
            "and one line on its job to its package's table.",
        )

    def test_every_named_python_file_exists(self) -> None:
        mentions = _mentioned_py_paths(self.text)
        self.assertIn("devices/runtime.py", mentions)  # the pattern does find paths
        gone = sorted(m for m in mentions if not _exists(m))
        self.assertEqual(gone, [], f"docs/ARCHITECTURE.md names files that do not exist: {gone}")

    def test_the_patterns(self) -> None:
        text = "`devices/cpu.py`, `portable.py`, `paca_core/methods/<name>.py`, (`tests/conftest.py: backend_cases`)"
        self.assertEqual(_mentioned_py_paths(text), {"devices/cpu.py", "portable.py", "tests/conftest.py"})
        self.assertTrue(_named("the `paca_core/bench/` package", Path("paca_core/bench/__init__.py")))
        self.assertFalse(_named("paca_core/bench/run.py", Path("paca_core/bench/__init__.py")))
        self.assertFalse(_named("`x/paca_core/cli.py`", Path("paca_core/cli.py")))
        self.assertFalse(_exists("paca_core/no_such_module.py"))


if __name__ == "__main__":
    unittest.main()
