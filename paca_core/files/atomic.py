"""Atomic writes: a crash or Ctrl-C never leaves a half-written file or checkpoint directory."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Collection, Iterator

from ..errors import OutputPathError

#: What our own writers leave for an instant beside a target (``.name.staging-…``, ``.name.old-…``,
#: ``.name.….tmp``, the output-policy probe): never counted as a user's file.
OUR_TEMPORARIES = re.compile(r"^\..+\.(staging-|old-)[^/]*$|^\..+\.tmp$")


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once: there is no getter before Python 3.13's os)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, directory: bool = False) -> None:
    """``mkstemp``/``mkdtemp`` make owner-only files (0600/0700); what we publish gets the user's umask instead,
    as ``open()`` and ``mkdir`` would have given it (a team's shared cluster folders stay readable)."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    honour_umask(Path(tmp))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the caller has written it, it replaces ``path`` in one rename.

    For writers that take a file name (safetensors' ``save_file``) and outputs too large to hold as bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    honour_umask(Path(tmp))
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _files_under(folder: Path) -> set[str]:
    """Every file and symbolic link under ``folder`` (links not followed), as relative ``a/b`` paths."""
    found = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        relative = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add((relative / name).as_posix())
    return found


def entries_lost(target: Path, staging: Path, owned: Collection[str] = ()) -> list[str]:
    """What replacing ``target`` by ``staging`` would delete, at every depth, that is neither rewritten by it nor
    ``owned`` by the writer (relative paths it may drop, e.g. an older format's files or its previous output's)."""
    keep = _files_under(staging) | set(owned)
    return sorted(name for name in _files_under(target)
                  if name not in keep and not any(OUR_TEMPORARIES.match(part) for part in name.split("/")))


@contextlib.contextmanager
def atomic_directory(target: Path, owned: Collection[str] = ()) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``target`` in one rename.

    The previous ``target`` (if any) survives until the new one is complete, so an interrupted save
    leaves the last good checkpoint in place. On failure the staging directory is removed. A ``target``
    holding anything the new folder would not rewrite (and the writer does not ``owned``) is never
    replaced: :class:`~paca_core.errors.OutputPathError`, with nothing changed. A user's folder is not ours to drop.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{target} is a file, and a folder would replace it; nothing was written. Choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    honour_umask(staging, directory=True)
    try:
        yield staging
        for item in staging.rglob("*"):
            honour_umask(item, directory=item.is_dir())  # some writers (safetensors) create files owner-only
            if item.is_file():
                with open(item, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(staging)
        lost = entries_lost(target, staging, owned) if target.is_dir() else []
        if lost:
            shown = ", ".join(lost[:4]) + (f" and {len(lost) - 4} more" if len(lost) > 4 else "")
            raise OutputPathError(f"{target} holds files this save would delete ({shown}); nothing was replaced. Save to a new "
                                  "or empty folder.")
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.rmdir(old)
            os.replace(target, old)  # rename, not copy: the old checkpoint stays whole
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files_into(directory: Path) -> Iterator[Path]:
    """Yield a staging folder; on success each file staged there replaces its namesake in ``directory``, one
    rename each, and nothing else in ``directory`` is touched. The ``save_pretrained`` convention (PEFT,
    transformers) for a folder that holds other things too: a crash leaves every file old or new, never half."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".{directory.name}.staging-"))
    try:
        yield staging
        for item in sorted(staging.iterdir()):
            honour_umask(item, directory=item.is_dir())
            if item.is_file():
                with open(item, "rb") as handle:
                    os.fsync(handle.fileno())
        for item in sorted(staging.iterdir()):
            if item.is_dir():
                raise OutputPathError(f"atomic_files_into stages files only; {item.name} is a folder")
            os.replace(item, directory / item.name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staging_for(directory: Path, writes: Collection[str]):
    """The right atomic writer for a ``save_pretrained``-style save of the files ``writes`` into ``directory``: the
    whole folder swapped when it is new or holds only those files, else the files replaced one by one beside the
    user's (never deleting them)."""
    directory = Path(directory)
    if directory.is_dir() and any(name not in writes and not OUR_TEMPORARIES.match(name) for name in os.listdir(directory)):
        return atomic_files_into(directory)
    return atomic_directory(directory)
