"""Throwaway installed distributions for the plug-in tests.

``write_distribution`` lays out what ``pip install`` leaves in site-packages — the modules and a
``<name>-<version>.dist-info`` folder with ``METADATA`` and ``entry_points.txt`` — so a folder put on
``sys.path`` (or ``PYTHONPATH``) is found by ``importlib.metadata`` itself: the tests exercise real
package metadata, not a stand-in for ``entry_points``.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path


def write_distribution(
    root: Path,
    name: str,
    entry_points: dict[str, dict[str, str]],
    files: dict[str, str],
    version: str = "0.1",
) -> Path:
    """Write distribution ``name`` into ``root``: ``files`` (relative path -> text, dedented) and its
    dist-info with ``entry_points`` (group -> {entry-point name: "module:attribute"}). Returns ``root``."""
    root = Path(root)
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    info = root / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    sections = []
    for group, points in entry_points.items():
        sections.append(f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()))
    (info / "entry_points.txt").write_text("\n".join(sections), encoding="utf-8")
    return root
