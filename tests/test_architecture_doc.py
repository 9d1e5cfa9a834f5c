"""docs/ARCHITECTURE.md is a map that stays true: it names every package of the three layers, names no Python file
that does not exist, and stays short enough to read in ten minutes; the per-module detail lives in each module's
docstring, which every module has.

Convention: the page names a package by its folder in backticks with a trailing slash (`paca_core/bench/`) and a
file by its path from the repository root (`paca_core/files/outputs.py`); a bare file name (``portable.py``) names
some file of the repository. Placeholders such as ``paca_core/methods/<name>.py`` are skipped.

Stdlib only, reads files only: part of the fast tier.
"""
from __future__ import annotations

import ast
import re
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
PACKAGES = ("devices", "backends", "paca_core")
#: Folders whose .py files a bare file name in the document may refer to.
SEARCHED = PACKAGES + ("tests", "scripts", "examples")
#: The page's size limit: a map, not a restatement of the code.
MAX_BYTES = 15 * 1024
#: A path-like mention of a Python file; ``<name>.py`` placeholders never match (``<``/``>`` end a token).
_PY_PATH = re.compile(r"(?<![\w./<>-])([\w][\w./-]*\.py)(?![\w])")


def _packages() -> list[Path]:
    """Every package folder of the three layers, relative to the repository root."""
    found = []
    for top in PACKAGES:
        for init in sorted((REPO / top).rglob("__init__.py")):
            relative = init.parent.relative_to(REPO)
            if "__pycache__" not in relative.parts:
                found.append(relative)
    return found


def _modules() -> list[Path]:
    return [p for top in PACKAGES for p in sorted((REPO / top).rglob("*.py")) if "__pycache__" not in p.parts]


def _mentioned_py_paths(text: str) -> set[str]:
    return {match.group(1) for match in _PY_PATH.finditer(text)}


def _exists(mention: str) -> bool:
    if "/" in mention:
        return (REPO / mention).is_file()
    return any(any((REPO / folder).rglob(mention)) for folder in SEARCHED if (REPO / folder).is_dir())


class ArchitectureDocTest(unittest.TestCase):
    def setUp(self) -> None:
        self.text = DOC.read_text(encoding="utf-8")

    def test_every_package_is_on_the_page(self) -> None:
        packages = _packages()
        self.assertGreater(len(packages), 10)  # it did find the packages
        missing = [p.as_posix() for p in packages if f"`{p.as_posix()}/`" not in self.text and p.as_posix() not in PACKAGES]
        self.assertEqual(missing, [], f"docs/ARCHITECTURE.md does not name {missing}: add its folder (`{missing[:1]}/`) and its job.")
        for top in PACKAGES:
            self.assertIn(f"**`{top}/`**" if top != "paca_core" else "paca_core", self.text)

    def test_every_named_python_file_exists(self) -> None:
        # The plug-ins the page prints live in a user's package (tests/test_architecture_plugins.py installs them).
        outside = re.sub(r"<!-- plugin: \w+ -->\n```python\n.*?```", "", self.text, flags=re.S)
        mentions = _mentioned_py_paths(outside)
        self.assertIn("devices/runtime.py", mentions)  # the pattern does find paths
        gone = sorted(m for m in mentions if not _exists(m))
        self.assertEqual(gone, [], f"docs/ARCHITECTURE.md names files that do not exist: {gone}")

    def test_the_page_is_short(self) -> None:
        self.assertLessEqual(len(self.text.encode("utf-8")), MAX_BYTES, "docs/ARCHITECTURE.md is a map: keep it under 15 KB")

    def test_every_module_says_its_job(self) -> None:
        silent = []
        for path in _modules():
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if path.name != "__init__.py" or tree.body:
                if not ast.get_docstring(tree):
                    silent.append(path.relative_to(REPO).as_posix())
        self.assertEqual(silent, [], f"modules without a docstring saying their job: {silent}")

    def test_the_patterns(self) -> None:
        text = "`devices/cpu.py`, `portable.py`, `paca_core/methods/<name>.py`, (`tests/conftest.py: backend_cases`)"
        self.assertEqual(_mentioned_py_paths(text), {"devices/cpu.py", "portable.py", "tests/conftest.py"})
        self.assertFalse(_exists("paca_core/no_such_module.py"))


if __name__ == "__main__":
    unittest.main()
