"""scripts/import_structure.py on this repository (no package cycles, no cycles hidden in functions, no
upward imports), the checker itself on small package trees that have each fault, and the parser
modules of ``paca bench`` / ``paca plan`` importing no torch when they are loaded."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "import_structure.py"


def _load_checker():
    spec = importlib.util.spec_from_file_location("import_structure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


checker = _load_checker()


def _tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``{relative path: source}``; every folder on the way becomes a package."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in [path.parent, *path.parent.parents]:
            if folder == root or root not in folder.parents:
                break
            (folder / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
    return root


# --- the repository --------------------------------------------------------------------------------------
def test_repository_has_no_cycles_and_no_upward_imports():
    report = checker.analyse(REPO)
    assert len(report.modules) > 50 and report.edges  # it did read the packages
    assert report.package_cycles == [], report.lines()
    assert report.hidden_cycles == [], report.lines()
    assert report.module_cycles == [], report.lines()
    assert report.upward_imports == [], report.lines()


def test_script_exits_0_on_the_repository():
    done = subprocess.run([sys.executable, str(SCRIPT), str(REPO)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 package cycles, 0 hidden cycles, 0 module cycles, 0 upward imports" in done.stdout


def test_bench_and_plan_share_workloads_and_only_bench_uses_the_planner():
    report = checker.analyse(REPO)
    packages = {(checker.package_of(e.importer, report.modules), checker.package_of(e.imported, report.modules)) for e in report.edges}
    assert ("paca_core.plan", "paca_core.workloads") in packages and ("paca_core.bench", "paca_core.workloads") in packages
    assert ("paca_core.bench", "paca_core.plan") in packages  # max-context plans first
    assert not any(a == "paca_core.plan" and b == "paca_core.bench" for a, b in packages)
    assert not any(a == "paca_core.workloads" and b in ("paca_core.bench", "paca_core.plan") for a, b in packages)


# --- the checker on synthetic trees ---------------------------------------------------------------------
def test_a_cycle_through_a_function_level_import_is_a_package_cycle_and_a_hidden_cycle(tmp_path):
    root = _tree(tmp_path, {
        "top/alpha/one.py": "from ..beta import two\n",
        "top/beta/two.py": """
            def late():
                from ..alpha import one
                return one
        """,
    })
    report = checker.analyse(root, packages=("top",), layers=())
    assert report.package_cycles == [["top.alpha", "top.beta"]]
    assert report.module_cycles == []  # Python loads it fine: the import in late() runs after both modules exist
    [(edge, path)] = report.hidden_cycles
    assert (edge.importer, edge.imported, edge.function, edge.line) == ("top.beta.two", "top.alpha.one", "late", 3)
    assert path == ["top.beta.two", "top.alpha.one", "top.beta.two"]
    assert report.problems == 2


def test_a_package_cycle_through_different_modules_without_a_module_cycle(tmp_path):
    root = _tree(tmp_path, {
        "top/alpha/one.py": "import top.beta.two\n",
        "top/alpha/three.py": "X = 3\n",
        "top/beta/two.py": "X = 2\n",
        "top/beta/four.py": "from top.alpha.three import X\n",
    })
    report = checker.analyse(root, packages=("top",), layers=())
    assert report.package_cycles == [["top.alpha", "top.beta"]]
    assert report.hidden_cycles == [] and report.module_cycles == []


def test_three_packages_in_a_ring_are_one_package_cycle(tmp_path):
    root = _tree(tmp_path, {
        "top/a/m.py": "from top.b import m\n",
        "top/b/m.py": "from top.c import m\n",
        "top/c/m.py": "def f():\n    from top.a import m\n",
    })
    report = checker.analyse(root, packages=("top",), layers=())
    assert report.package_cycles == [["top.a", "top.b", "top.c"]]
    assert [path for _, path in report.hidden_cycles] == [["top.c.m", "top.a.m", "top.b.m", "top.c.m"]]


def test_module_cycle_and_type_checking_imports(tmp_path):
    root = _tree(tmp_path, {
        "top/gamma/a.py": "from . import b\n",
        "top/gamma/b.py": "from .a import b as _\n",
        "top/delta/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from top.epsilon.d import D\n",
        "top/epsilon/d.py": "from top.delta import c\nclass D: ...\n",
    })
    report = checker.analyse(root, packages=("top",), layers=())
    assert report.module_cycles == [["top.gamma.a", "top.gamma.b"]]
    # A type-only import never runs, so it closes no module cycle; it hides one, and the packages depend on each other.
    assert report.package_cycles == [["top.delta", "top.epsilon"]]
    [(edge, path)] = report.hidden_cycles
    assert (edge.importer, edge.where, path) == ("top.delta.c", "type-checking", ["top.delta.c", "top.epsilon.d", "top.delta.c"])
    assert "imports top.epsilon.d under TYPE_CHECKING (line 3)" in "\n".join(report.lines())


def test_parent_and_child_packages_are_not_a_cycle(tmp_path):
    root = _tree(tmp_path, {
        "top/__init__.py": "",
        "top/cli.py": "from .sub import tool\n",
        "top/errors.py": "class Error(Exception): ...\n",
        "top/sub/tool.py": "from ..errors import Error\n",
    })
    report = checker.analyse(root, packages=("top",), layers=())
    assert report.problems == 0, report.lines()


def test_upward_imports_follow_each_layer_chain(tmp_path):
    root = _tree(tmp_path, {
        "low/base.py": "def f():\n    import high.app\n",
        "high/app.py": "import low.base\n",
        "high/shared/util.py": "X = 1\n",
        "high/tool/run.py": "from high.shared import util\n",
        "high/shared/bad.py": "from high.tool import run\n",
    })
    report = checker.analyse(root, packages=("low", "high"), layers=(("low", "high"), ("high.shared", "high.tool")))
    upward = sorted((e.importer, e.imported, e.where) for e in report.upward_imports)
    assert upward == [("high.shared.bad", "high.tool.run", "module"), ("low.base", "high.app", "function")]


def test_script_exits_1_and_names_what_it_found(tmp_path):
    root = _tree(tmp_path, {
        "devices/probe.py": "def f():\n    from paca_core import model\n",
        "backends/__init__.py": "",
        "paca_core/model.py": "import devices.probe\n",
    })
    done = subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "upward import: devices.probe -> paca_core.model" in done.stdout
    assert "package cycle: devices -> paca_core -> devices" in done.stdout
    assert "hidden cycle: devices.probe imports paca_core.model inside f()" in done.stdout


# --- the parser modules are cheap to import --------------------------------------------------------------
@pytest.mark.parametrize("module", ["paca_core.bench.command", "paca_core.plan.command"])
def test_parser_modules_import_no_torch(module):
    """``paca --help`` builds every subcommand's parser; loading these modules must not pull torch,
    transformers or peft in (paca_core/__init__.py is bypassed: it is not these modules' import)."""
    code = textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType("paca_core")
        package.__path__ = [{str(REPO / "paca_core")!r}]
        sys.modules["paca_core"] = package
        import {module}
        print(sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_scripts_use_only_public_names_of_the_packages():
    """scripts/ are users of the library: a private name they import is a contract nobody declared."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    private = []
    for path in sorted((root / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("devices", "backends", "paca_core"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private
