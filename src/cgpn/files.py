"""Files written whole or not at all: a run killed while writing leaves the previous file (or none), never a
torn one. Every file cgpn writes for a user (checkpoints, features, indexes, ONNX graphs, pictures) goes
through ``atomic_path``; a folder of files that belong together (a synthetic sequence) through
``atomic_folder``, which also refuses to replace a folder the command did not write."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_folder", "atomic_path", "check_folder_replaceable", "new_file_mode"]


def new_file_mode() -> int:
    """The permissions ``open()`` would give a new file (0o666 less the umask): temporary files are made
    0o600, and a renamed one would otherwise stay unreadable to the other users of a shared folder."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; fsynced and renamed over ``path`` when the block ends,
    removed if it raises. The temporary name keeps the suffix, for writers that pick a format from it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "expected a file name, got a folder", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as err:  # named after the file the user asked for, not the temporary one
        raise type(err)(err.errno, f"cannot write a file there ({err.strerror})", str(path)) from None
    os.close(fd)
    os.chmod(tmp, new_file_mode())
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_folder_replaceable(path: str | Path, marker: str, command: str) -> None:
    """Raise ``ConfigError`` unless ``path`` is missing, an empty folder, or a folder holding ``marker`` (the
    file ``command`` writes into every folder it makes): a command replaces only what it can prove it wrote."""
    from cgpn.errors import ConfigError

    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"'{path}' is a file; {command} writes a folder: pass a new folder name")
    if not (path / marker).is_file() and any(path.iterdir()):
        raise ConfigError(f"'{path}' holds files that {command} did not write (no {marker} in it); it replaces "
                          "only folders it wrote: pass a new or empty folder, or remove that one yourself")


@contextlib.contextmanager
def atomic_folder(path: str | Path, marker: str, command: str) -> Iterator[Path]:
    """A new temporary folder beside ``path`` to write into; when the block ends it replaces ``path`` in two
    renames, and is removed if the block raises. ``path`` is checked first (``check_folder_replaceable``)
    and again before the swap; the block must write ``marker`` into the folder."""
    path = Path(path)
    check_folder_replaceable(path, marker, command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as err:
        raise type(err)(err.errno, f"cannot write a folder there ({err.strerror})", str(path)) from None
    mode = new_file_mode()
    os.chmod(tmp, mode | (mode & 0o444) >> 2)  # like mkdir(): searchable wherever readable
    old = None
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"the writer of {path} did not leave its marker {marker}")
        check_folder_replaceable(path, marker, command)  # nothing else moved in meanwhile
        if path.exists():
            old = path.parent / f"{tmp.name[:-4]}.old"
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
