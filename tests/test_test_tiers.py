"""The two test tiers: plain `pytest` runs the fast tier, `pytest -m slow` the rest (scripts/test.sh runs both).

The `slow` marker must be registered and deselected by the default options in pyproject.toml (an explicit
`-m` on the command line comes later and overrides it), and markers must be strict, so that a misspelt
`@pytest.mark.slow` fails collection instead of quietly leaving a slow test in the fast tier."""
import shlex
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _pytest_options():
    return tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]


def test_slow_marker_is_registered():
    names = [line.split(":", 1)[0].strip() for line in _pytest_options()["markers"]]
    assert "slow" in names


def _addopts():
    addopts = _pytest_options()["addopts"]
    return shlex.split(addopts) if isinstance(addopts, str) else list(addopts)


def test_default_options_deselect_the_slow_tier():
    words = _addopts()
    expressions = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-m"]
    expressions += [word[len("-m"):].lstrip("=") for word in words if word.startswith("-m") and word != "-m"]
    assert expressions == ["not slow"], words


def test_markers_are_strict():
    assert "--strict-markers" in _addopts()


def test_this_run_sees_the_slow_marker(pytestconfig):
    assert any(line.split(":", 1)[0].strip() == "slow" for line in pytestconfig.getini("markers"))



class _Options:
    """The two options the worker count reads, as pytest's config answers them."""

    def __init__(self, paths, markexpr):
        self.values = {"file_or_dir": paths, "markexpr": markexpr}

    def getoption(self, name):
        return self.values[name]


def test_only_the_whole_fast_tier_runs_on_several_workers(monkeypatch):
    from . import conftest

    assert "-n" in _addopts() and "auto" in _addopts() and "loadscope" in _addopts()  # module fixtures run once
    monkeypatch.setattr(conftest, "_usable_cpus", lambda: 2)
    assert conftest.pytest_xdist_auto_num_workers(_Options([], "not slow")) == 2  # plain `pytest` on CI's two cores
    monkeypatch.setattr(conftest, "_usable_cpus", lambda: 64)
    assert conftest.pytest_xdist_auto_num_workers(_Options([], "not slow")) == conftest.MAX_TEST_WORKERS
    assert conftest.pytest_xdist_auto_num_workers(_Options([], "slow")) == 0  # torchrun ranks, bench workers
    assert conftest.pytest_xdist_auto_num_workers(_Options([], "accelerator and not slow")) == 0  # one device
    assert conftest.pytest_xdist_auto_num_workers(_Options(["tests/test_plan.py"], "not slow")) == 0
