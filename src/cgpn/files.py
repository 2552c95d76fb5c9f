"""Files written whole or not at all: a run killed while writing leaves the previous file (or none), never a
torn one. Every file cgpn writes for a user (checkpoints, features, indexes, ONNX graphs, pictures) goes
through ``atomic_path``."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "new_file_mode"]


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
