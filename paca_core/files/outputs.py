"""Where a command may write: one output policy for ``paca train``, ``merge``, ``export-peft``, ``plan`` and ``bench``.

A user's files are sacred, so a command never deletes or replaces anything it did not write:

* ``--out`` must be a new folder, an empty one, or a previous output of the *same* command. Each output
  folder carries a small marker (:data:`MARKER_NAME`) saying which command wrote it and which entries are
  its own, down to every file at every depth; a folder holding anything else (a user's note inside ``adapter/``
  too) is refused with one line naming what is there, before anything is removed or any step runs.
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
import fnmatch
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .._version import __version__
from .atomic import OUR_TEMPORARIES, atomic_directory, write_bytes_atomic
from ..errors import OutputPathError

logger = logging.getLogger(__name__)

MARKER_NAME = ".paca-output.json"

#: Recognises an output written before outputs carried a marker: ``(folder, entries) -> bool``.
LegacyCheck = Callable[[Path, "set[str]"], bool]

#: Files inside an output's folders that each command writes under fixed names (``fnmatch`` patterns, relative
#: paths): what an output from before markers listed every file (or one a crash left before its marker was
#: refreshed) may hold below its top level. Anything else there must be listed in the marker's ``files``.
KNOWN_NESTED: dict[str, tuple[str, ...]] = {
    "train": ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoint/adapter_config.json",
              "checkpoint/adapter_model.safetensors", "checkpoint/trainer_state.json", "checkpoint/trainer_state.safetensors",
              "checkpoint/trainer_state.pt", "runs/events.out.tfevents.*"),
    "bench": ("logs/*.log",),
    "train --logging-dir": ("events.out.tfevents.*",),
}


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
    #: Every file of the previous output (relative paths, at every depth): all of them checked to be this command's.
    previous_files: list[str] = field(default_factory=list)

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


def walk_files(folder: Path) -> list[str]:
    """Every file and symbolic link under ``folder`` at every depth (links not followed), as relative ``a/b`` paths,
    minus the top-level marker and our atomic writers' temporaries; folders themselves are not listed."""
    found: list[str] = []

    def fail(error: OSError) -> None:
        raise error

    for root, dirs, files in os.walk(folder, onerror=fail, followlinks=False):
        relative = Path(root).relative_to(folder)
        dirs[:] = [name for name in dirs if not OUR_TEMPORARIES.match(name)]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            if OUR_TEMPORARIES.match(name) or (name == MARKER_NAME and relative == Path(".")):
                continue
            found.append((relative / name).as_posix())
    return sorted(found)


def resolved(path: Path, flag: str, shown: str) -> Path:
    """``path`` with its symbolic links resolved; a loop (a link that leads back to itself) is one line naming the flag."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:  # Python < 3.13: RuntimeError("Symlink loop ..."); later: OSError(ELOOP)
        if isinstance(error, OSError) and error.errno != errno.ELOOP:
            raise
        raise OutputPathError(f"{flag} {shown} is a symbolic link loop (following its links leads back to it): pass a real "
                              "folder.") from None


def _names(entries, limit: int = 4) -> str:
    shown = sorted(entries)[:limit]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def input_holding(path: Path, inputs: Mapping[str, str | os.PathLike[str] | None]) -> tuple[str, str, Path] | None:
    """The first of ``inputs`` (flag -> path, links resolved) that ``path`` (resolved) is or lies inside: ``(flag, the
    path as given, the resolved input)``; None when it is none of them. Unset and ``default`` inputs are skipped."""
    for name, value in inputs.items():
        if value is None or str(value) in ("", "default"):
            continue
        source = resolved(Path(os.path.abspath(Path(value).expanduser())), name, str(value))
        if _within(path, source):
            return name, str(value), source
    return None


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
    real = resolved(path, flag, shown)
    existing = _nearest_existing(path)
    if existing != path and not existing.is_dir():
        raise OutputPathError(f"{flag} {shown}: {existing} is a file, not a folder, so nothing can be written under it; choose another {flag}.")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {shown} is a file, and this command writes a folder there; choose a new folder name for {flag}.")
    resume_path = resolved(Path(os.path.abspath(Path(resume).expanduser())), "--resume", str(resume)) if resume else None
    holding = input_holding(real, inputs or {})
    if holding is not None:
        name, value, source = holding
        what = "is" if real == source else "lies inside"
        raise OutputPathError(f"{flag} {shown} {what} the {name} {value}: writing there would replace what this command reads; "
                              f"choose another {flag}.")
    for name, value in (inputs or {}).items():
        if value is None or str(value) in ("", "default"):
            continue
        source = resolved(Path(os.path.abspath(Path(value).expanduser())), name, str(value))
        if _within(source, real) and not (resume_path is not None and _within(source, resume_path)):
            raise OutputPathError(f"{name} {value} lies inside {flag} {shown}, which this command writes; choose another {flag} "
                                  f"(or move {value} out of it).")
    target = OutputTarget(path=path, command=command, overwrite=overwrite)
    if path.is_dir():
        _check_contents(target, shown, overwrite=overwrite, continues=resume_path is not None, legacy=legacy, flag=flag)
    _check_writable(existing if existing != path else path, shown, flag)
    return target


def _check_contents(target: OutputTarget, shown: str, *, overwrite: bool, continues: bool, legacy: LegacyCheck | None, flag: str) -> None:
    """An existing folder as ``target``: empty, or this command's earlier output down to its last file (the marker's
    list, or the names the command always writes); records the earlier output's files, the only ones ever removed."""
    try:
        entries = user_entries(target.path)
        files = walk_files(target.path)
    except OSError as error:
        raise OutputPathError(f"{flag} {shown} cannot be read ({error.strerror}); choose another {flag}.") from None
    marker = read_marker(target.path)
    if not entries and marker is None:
        return  # an empty folder: ours to fill
    if marker is not None and marker["command"] != target.command:
        raise OutputPathError(f"{flag} {shown} holds a `paca {marker['command']}` output, not a `paca {target.command}` one; "
                              f"choose another {flag}.")
    if marker is not None:
        ours = set(marker.get("entries") or [])
        written = f" (written {marker['written']})" if marker.get("written") else ""
    elif legacy is not None and legacy(target.path, entries):
        ours, written = set(entries), " (written by an earlier paca-hal)"
    else:
        raise OutputPathError(f"{flag} {shown} already holds files this tool did not write ({_names(entries)}); "
                              f"choose a new or empty folder for {flag}.")
    listed = set(marker.get("files") or []) if marker is not None else set()
    known = KNOWN_NESTED.get(target.command, ())
    foreign = sorted(entries - ours) + [
        name for name in files
        if name.split("/", 1)[0] in ours and "/" in name and name not in listed and not any(fnmatch.fnmatchcase(name, p) for p in known)
    ]
    if foreign:
        raise OutputPathError(f"{flag} {shown} holds files `paca {target.command}` did not write ({_names(foreign)}); move them "
                              f"out or choose another {flag}.")
    target.previous, target.previous_entries = True, sorted(entries)
    target.previous_files = [name for name in files if name.split("/", 1)[0] in ours]
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


def _marker_bytes(command: str, entries: list[str], files: list[str]) -> bytes:
    """The marker: which command wrote the folder, its top-level entries, and every file under them (at every depth),
    so a file a user adds anywhere inside is told apart from ours."""
    document = {
        "tool": "paca-hal",
        "command": command,
        "library_version": __version__,
        "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "entries": sorted(entries),
        "files": sorted(files),
    }
    return json.dumps(document, indent=1).encode()


@contextlib.contextmanager
def publish_directory(target: OutputTarget, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; once written, it becomes ``target`` in one rename.

    A crash or a full disk leaves the previous state (nothing, or the previous output) and no staging folder; a
    full disk is reported as :class:`DiskFullError` naming ``target`` and ``needed_bytes``. The folder's contents
    are re-checked right before the swap (:func:`~paca_core.files.atomic.atomic_directory`), so a file a user dropped in
    meanwhile is kept and nothing is replaced.
    """
    try:
        with atomic_directory(target.path, owned=target.previous_files + [MARKER_NAME]) as staging:
            yield staging
            entries = [name for name in os.listdir(staging) if name != MARKER_NAME]
            (staging / MARKER_NAME).write_bytes(_marker_bytes(target.command, entries, walk_files(staging)))
    except Exception as error:
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise disk_full_error(error, target.path, needed_bytes) from error
        raise


class RunFolder:
    """``paca train``'s output folder, whose entries (``checkpoint/``, ``adapter/``, ``metrics.json``) are each
    written atomically at different times. The previous run's files (with ``--overwrite``) are removed at this
    run's first write, so until then the folder holds the whole previous run, and after it only this run's. Only the
    files the preflight found to be the previous run's are removed (never a folder whole), and the marker lists every
    file under the run's entries each time one is claimed and after each write (:meth:`refresh`)."""

    def __init__(self, target: OutputTarget):
        self.target = target
        self.entries: set[str] = set()
        self._claimed = False
        #: Previous entries (with --overwrite) whose files are still to be removed.
        self._stale: set[str] = set()

    @property
    def path(self) -> Path:
        return self.target.path

    def claim(self, entry: str) -> Path:
        """Call before writing ``entry`` (a top-level name) into the folder; returns its path."""
        if not self._claimed:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.target.previous and self.target.overwrite:
                self._stale = set(self.target.previous_entries)
                for name in sorted(self._stale - {entry}):
                    self.remove_previous(name)
            elif self.target.previous:  # continuing (--resume): the previous run's entries stay ours
                marker = read_marker(self.path)
                self.entries.update((marker or {}).get("entries") or self.target.previous_entries)
            self._claimed = True
        self._stale.discard(entry)  # written whole by an atomic writer from now on
        if entry not in self.entries:
            self.entries.add(entry)
            self.refresh()
        return self.path / entry

    def remove_previous(self, entry: str) -> None:
        """Remove the previous run's files under ``entry`` (those the preflight checked), then the folders they leave
        empty. Anything else found there (dropped in since the check) stays, and is said."""
        self._stale.discard(entry)
        prefix = entry + "/"
        for name in self.target.previous_files:
            if name == entry or name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / name)
        top = self.path / entry
        if top.is_dir() and not top.is_symlink():
            for root, _dirs, _files in sorted(os.walk(top), key=lambda item: -len(item[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(root)  # only succeeds on an empty folder
            if top.exists():
                logger.warning("Kept %s: it holds files the previous run did not write.", top)

    def refresh(self) -> None:
        """Rewrite the marker with every file now under this run's entries (call after writing one). Before the first
        claim it does nothing: the folder still holds the previous run, whose marker stays as it was."""
        if not self._claimed:
            return
        files = [name for name in walk_files(self.path) if name.split("/", 1)[0] in self.entries] if self.path.is_dir() else []
        write_bytes_atomic(self.path / MARKER_NAME, _marker_bytes(self.target.command, sorted(self.entries), files))


class OutputFolder(RunFolder):
    """An output folder another library fills with files of its own naming (TensorBoard's event files in
    ``--logging-dir``): checked like any output before the run, opened (the previous output's files removed with
    ``--overwrite``) when the library starts, and its marker listing whatever is in it after the run."""

    def open(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.target.previous and self.target.overwrite:
            for name in self.target.previous_entries:
                self.remove_previous(name)
        self._claimed = True
        self.refresh()
        return self.path

    def refresh(self) -> None:
        if self._claimed:
            self.entries = user_entries(self.path)  # the preflight found only our files here; the rest is this run's
        super().refresh()


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
    "KNOWN_NESTED", "MARKER_NAME", "DiskFullError", "OutputFolder", "OutputPathError", "OutputTarget", "RunFolder", "check_free_space", "check_output",
    "disk_full_error", "format_size", "is_disk_full", "publish_directory", "read_marker", "resolved", "user_entries", "walk_files",
]
