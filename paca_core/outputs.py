"""Where a command may write: one output policy for ``paca train``, ``merge``, ``export-peft``, ``plan`` and ``bench``.

A user's files are sacred, so a command never deletes or replaces anything it did not write:

* ``--out`` must be a new folder, an empty one, or a previous output of the *same* command. Each output
  folder carries a small marker (:data:`MARKER_NAME`) saying which command wrote it and which entries are
  its own; a folder holding anything else is refused with one line naming what is there.
* A previous output is replaced only with ``--overwrite`` (``paca train`` may also continue it with ``--resume``).
* ``--out`` may not be, or lie inside, an input (model, adapter, data, resume folder), and an input may not lie
  inside it.
* It is checked before anything heavy runs (is a file, lies under a file, cannot be written, read-only file
  system), so no run trains for hours and then fails at its first save.

Writing is :func:`publish_directory` (a whole folder staged beside the target and renamed into place) or
:class:`RunFolder` (a run's folder, whose entries are each written atomically as the run goes).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from ._version import __version__
from .atomic import OUR_TEMPORARIES, atomic_directory, write_bytes_atomic
from .errors import OutputPathError

logger = logging.getLogger(__name__)

MARKER_NAME = ".paca-output.json"

#: Recognises an output written before outputs carried a marker: ``(folder, entries) -> bool``.
LegacyCheck = Callable[[Path, "set[str]"], bool]


class DiskFullError(OSError):
    """A write ran out of space; the message names the path, the bytes needed and the bytes free."""


@dataclass
class OutputTarget:
    """A checked ``--out``: where the command writes and whether a previous output of it is there."""

    path: Path
    command: str
    previous: bool = False
    overwrite: bool = False
    previous_entries: list[str] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.path.exists()


def _display(path: Path | str) -> str:
    return str(path)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path("/")


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder this tool wrote, or None (absent, unreadable, or not ours)."""
    try:
        document = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("tool") != "paca-hal" or not isinstance(document.get("command"), str):
        return None
    return document


def user_entries(folder: Path) -> set[str]:
    """What a folder holds, minus our marker and our own atomic writers' temporaries."""
    return {name for name in os.listdir(folder) if name != MARKER_NAME and not OUR_TEMPORARIES.match(name)}


def _names(entries, limit: int = 4) -> str:
    shown = sorted(entries)[:limit]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(
    out: str | os.PathLike[str],
    command: str,
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    overwrite: bool = False,
    resume: str | os.PathLike[str] | None = None,
    legacy: LegacyCheck | None = None,
    flag: str = "--out",
) -> OutputTarget:
    """Check ``out`` against the output policy before any heavy work; raise :class:`OutputPathError` if it fails.

    ``inputs``: what the command reads, by name (``{"--model": path, "--data": path}``): ``out`` may not be or
    lie inside one, nor hold one. ``resume``: a ``paca train --resume`` folder, which may lie inside ``out`` (the
    run continues there). ``legacy``: recognises this command's outputs from versions without the marker.
    """
    if out is None or not str(out).strip():
        raise OutputPathError(f"{flag} is empty: pass a folder to write to.")
    path = Path(os.path.abspath(Path(out).expanduser()))
    shown = _display(out)
    resolved = path.resolve()
    existing = _nearest_existing(path)
    if existing != path and not existing.is_dir():
        raise OutputPathError(f"{flag} {shown}: {existing} is a file, not a folder, so nothing can be written under it; choose another {flag}.")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {shown} is a file, and this command writes a folder there; choose a new folder name for {flag}.")
    resume_path = Path(os.path.abspath(Path(resume).expanduser())).resolve() if resume else None
    for name, value in (inputs or {}).items():
        if value is None or str(value) in ("", "default"):
            continue
        source = Path(os.path.abspath(Path(value).expanduser())).resolve()
        if _within(resolved, source):
            what = "is" if resolved == source else "lies inside"
            raise OutputPathError(f"{flag} {shown} {what} the {name} {value}: writing there would replace what this command reads; "
                                  f"choose another {flag}.")
        if _within(source, resolved) and not (resume_path is not None and _within(source, resume_path)):
            raise OutputPathError(f"{name} {value} lies inside {flag} {shown}, which this command writes; choose another {flag} "
                                  f"(or move {value} out of it).")
    target = OutputTarget(path=path, command=command, overwrite=overwrite)
    if path.is_dir():
        _check_contents(target, shown, overwrite=overwrite, continues=resume_path is not None, legacy=legacy, flag=flag)
    _check_writable(existing if existing != path else path, shown, flag)
    return target


def _check_contents(target: OutputTarget, shown: str, *, overwrite: bool, continues: bool, legacy: LegacyCheck | None, flag: str) -> None:
    try:
        entries = user_entries(target.path)
    except OSError as error:
        raise OutputPathError(f"{flag} {shown} cannot be read ({error.strerror}); choose another {flag}.") from None
    marker = read_marker(target.path)
    if not entries and marker is None:
        return  # an empty folder: ours to fill
    if marker is not None and marker["command"] != target.command:
        raise OutputPathError(f"{flag} {shown} holds a `paca {marker['command']}` output, not a `paca {target.command}` one; "
                              f"choose another {flag}.")
    if marker is not None:
        foreign = entries - set(marker.get("entries") or [])
        if foreign:
            raise OutputPathError(f"{flag} {shown} holds files `paca {target.command}` did not write ({_names(foreign)}); move them "
                                  f"out or choose another {flag}.")
        written = f" (written {marker['written']})" if marker.get("written") else ""
    elif legacy is not None and legacy(target.path, entries):
        written = " (written by an earlier paca-hal)"
    else:
        raise OutputPathError(f"{flag} {shown} already holds files this tool did not write ({_names(entries)}); "
                              f"choose a new or empty folder for {flag}.")
    target.previous, target.previous_entries = True, sorted(entries)
    if overwrite or continues:
        return
    hint = f", --resume {shown} to continue it," if target.command == "train" else ""
    raise OutputPathError(f"{flag} {shown} holds a previous `paca {target.command}` output{written}: pass --overwrite to replace it{hint} "
                          f"or choose another {flag}.")


def _check_writable(folder: Path, shown: str, flag: str) -> None:
    """Create and delete one empty file where the output will go: catches read-only file systems and permissions
    (``os.access`` alone does not know about read-only mounts for every file system, nor root's view)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".paca-write-check.", suffix=".tmp")
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputPathError(f"{flag} {shown} cannot be written ({reason} in {folder}); choose a writable {flag}.") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _marker_bytes(command: str, entries: list[str]) -> bytes:
    document = {
        "tool": "paca-hal",
        "command": command,
        "library_version": __version__,
        "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "entries": sorted(entries),
    }
    return json.dumps(document, indent=1).encode()


@contextlib.contextmanager
def publish_directory(target: OutputTarget, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; once written, it becomes ``target`` in one rename.

    A crash or a full disk leaves the previous state (nothing, or the previous output) and no staging folder; a
    full disk is reported as :class:`DiskFullError` naming ``target`` and ``needed_bytes``. The folder's contents
    are re-checked right before the swap (:func:`~paca_core.atomic.atomic_directory`), so a file a user dropped in
    meanwhile is kept and nothing is replaced.
    """
    try:
        with atomic_directory(target.path, owned=target.previous_entries + [MARKER_NAME]) as staging:
            yield staging
            entries = [name for name in os.listdir(staging) if name != MARKER_NAME]
            (staging / MARKER_NAME).write_bytes(_marker_bytes(target.command, entries))
    except Exception as error:
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise disk_full_error(error, target.path, needed_bytes) from error
        raise


class RunFolder:
    """``paca train``'s output folder, whose entries (``checkpoint/``, ``adapter/``, ``metrics.json``) are each
    written atomically at different times. The previous run's entries (with ``--overwrite``) are removed at this
    run's first write, so until then the folder holds the whole previous run, and after it only this run's."""

    def __init__(self, target: OutputTarget):
        self.target = target
        self.entries: set[str] = set()
        self._claimed = False

    @property
    def path(self) -> Path:
        return self.target.path

    def claim(self, entry: str) -> Path:
        """Call before writing ``entry`` (a top-level name) into the folder; returns its path."""
        if not self._claimed:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.target.previous and self.target.overwrite:
                marker = read_marker(self.path)
                for name in (marker or {}).get("entries") or self.target.previous_entries:
                    if name in self.target.previous_entries and name != entry:
                        _remove(self.path / name)
            elif self.target.previous:  # continuing (--resume): the previous run's entries stay ours
                marker = read_marker(self.path)
                self.entries.update((marker or {}).get("entries") or self.target.previous_entries)
            self._claimed = True
        if entry not in self.entries:
            self.entries.add(entry)
            write_bytes_atomic(self.path / MARKER_NAME, _marker_bytes(self.target.command, sorted(self.entries)))
        return self.path / entry


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a writer (safetensors) reports it only in its message."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left on device" in text or "disk quota exceeded" in text


def disk_full_error(error: BaseException, path: Path, needed_bytes: int | None) -> DiskFullError:
    """The one-line error for a write that ran out of space at ``path``."""
    try:
        free = shutil.disk_usage(_nearest_existing(Path(path))).free
    except OSError:
        free = None
    need = f"about {format_size(needed_bytes)} needed" if needed_bytes else "more space needed"
    have = f", {format_size(free)} free" if free is not None else ""
    reason = getattr(error, "strerror", None) or "No space left on device"
    return DiskFullError(errno.ENOSPC, f"disk full while writing {path} ({reason}): {need}{have}; nothing was replaced. Free "
                                       "space or choose another --out")


def check_free_space(path: Path, needed_bytes: int, flag: str = "--out") -> None:
    """Refuse before any work when the file system of ``path`` has less free space than ``needed_bytes``."""
    try:
        free = shutil.disk_usage(_nearest_existing(Path(path))).free
    except OSError:
        return
    if free < needed_bytes:
        raise OutputPathError(f"{flag} {path}: about {format_size(needed_bytes)} is needed but only {format_size(free)} is free on "
                              "that file system; free space or choose another folder.")


def format_size(count: int | None) -> str:
    if count is None:
        return "an unknown amount"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


__all__ = [
    "MARKER_NAME", "DiskFullError", "OutputPathError", "OutputTarget", "RunFolder", "check_free_space", "check_output",
    "disk_full_error", "format_size", "is_disk_full", "publish_directory", "read_marker", "user_entries",
]
