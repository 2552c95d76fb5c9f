"""The rules every cgpn command follows for the files it reads and writes, as functions a new command can reuse.

Writing:

- ``atomic_path``: a file is written whole or not at all (a temporary name beside it, fsync, rename), and the
  temporaries that killed writes of the same output left behind are removed first.
- ``check_output_file``: before any work, an output that cannot be written there, or that is one of the
  command's inputs (the same file, also through a symbolic or hard link), is refused in one line.
- ``write_folder``: a folder is written whole into a temporary folder beside it and swapped in; an existing
  folder is replaced only if the same command wrote it (``FOLDER_MARKER``).
- ``lock_folder``: one process at a time writes a folder (``fcntl.flock``, released when the process dies);
  the next one is told who holds it.

Reading:

- ``reading`` / ``input_file``: a missing, empty, unreadable or damaged input (or a folder where a file is
  expected) is one line naming the file, what it looks like (``describe_file``) and what was expected.
- ``load_torch_file``: ``torch.load(weights_only=True)`` whose failures say what the file is, and never pass
  on torch's advice to load it unsafely.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import json
import logging
import os
import pickletools
import shutil
import socket
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cgpn.errors import CgpnError, ConfigError, FolderInUseError

__all__ = [
    "FOLDER_MARKER",
    "LOCK_NAME",
    "atomic_path",
    "check_output_file",
    "check_replaceable_folder",
    "describe_file",
    "input_file",
    "load_torch_file",
    "lock_folder",
    "mark_in_progress",
    "new_file_mode",
    "other_name",
    "reading",
    "remove_abandoned",
    "remove_stale_temporaries",
    "write_folder",
]

logger = logging.getLogger(__name__)

FOLDER_MARKER = ".cgpn-folder.json"  # in a folder write_folder made: which command wrote it
LOCK_NAME = ".cgpn-lock"  # in a folder lock_folder holds: who holds it

PathLike = str | os.PathLike


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permissions ``open()`` would give a new file (0o666 less the umask): temporary files are made
    0o600, and a renamed one would otherwise stay unreadable to the other users of a shared folder."""
    return 0o666 & ~_umask()


# --- writing -------------------------------------------------------------------------------------------


def _temporary_affixes(path: Path) -> tuple[str, str]:
    """(prefix, suffix) of the temporary names of ``path``: ``.{stem}.{pid}-{random}.tmp{suffix}``. The suffix
    is kept, for writers that pick a format from it."""
    return f".{path.stem}.{os.getpid()}-", f".tmp{path.suffix}"


def _lock_exclusive(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; False if another open file holds one. Other
    failures (a file system without locks) raise OSError."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def mark_in_progress(fd: int) -> None:
    """Mark the temporary file or folder open as ``fd`` as being written, until ``fd`` is closed:
    ``remove_abandoned`` leaves it alone (a no-op where the file system has no locks)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Remove the temporaries that killed writes of ``path`` left beside it (``.{stem}.*.tmp{suffix}``);
    returns them. See ``remove_abandoned``."""
    path = Path(path)
    _, suffix = _temporary_affixes(path)
    return remove_abandoned(path.parent.glob(f".{glob.escape(path.stem)}.*{glob.escape(suffix)}"))


def remove_abandoned(temporaries: Iterable[PathLike]) -> list[Path]:
    """Remove those of ``temporaries`` (files or folders) that no live process is writing; returns them.

    A writer (``atomic_path``, ``write_folder``) holds an ``flock`` on its temporary until it is renamed;
    the kernel drops the lock when the writer dies, so a temporary nobody holds is abandoned.
    """
    removed = []
    for candidate in map(Path, temporaries):
        try:  # NFS locks a file exclusively only if it is open for writing
            fd = os.open(candidate, os.O_RDONLY if candidate.is_dir() else os.O_RDWR)
        except OSError:  # gone meanwhile, or not ours to write
            continue
        try:
            try:
                if not _lock_exclusive(fd):
                    continue
            except OSError:  # no locks here: no telling whether a writer is alive, so keep it
                continue
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            removed.append(candidate)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; fsynced and renamed over ``path`` when the block ends,
    removed if it raises. Temporaries of earlier writes of ``path`` that were killed are removed first.

    Example:
        >>> with atomic_path("gallery.npz") as tmp, tmp.open("wb") as f:  # doctest: +SKIP
        ...     np.savez(f, features=feats)
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "expected a file name, got a folder", str(path))
    prefix, suffix = _temporary_affixes(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    except OSError as err:  # named after the file the user asked for, not the temporary one
        raise type(err)(err.errno, f"cannot write a file there ({err.strerror})", str(path)) from None
    try:
        mark_in_progress(fd)
        os.fchmod(fd, new_file_mode())
        yield Path(tmp)
        written = os.open(tmp, os.O_RDONLY)  # the writer may have replaced the file: sync what is there now
        try:
            os.fsync(written)
        finally:
            os.close(written)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _stat_key(path: PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output_file(path: PathLike, flag: str,
                      inputs: Mapping[str, PathLike | Iterable[PathLike] | None] | None = None) -> Path:
    """``path`` as a Path if a command may write it, else a ConfigError in one line; call it before the work.

    Refused: a folder; a path under a file; a folder nobody may create files in (tried, so that it also holds
    for root and read-only file systems); and a file that is one of the command's inputs, compared by
    device and inode, so that a symbolic or hard link to an input counts as that input.

    Args:
        path: the output file, as given.
        flag: how the user named it (``--out``), for the message.
        inputs: how the user named each input (``--checkpoint``, ``an image of --images``) -> its path, or
            an iterable of paths (a data set's images).

    Example:
        >>> check_output_file(args.out, "--out", {"--checkpoint": args.checkpoint})  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} '{path}' is a folder; expected a file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} '{path}' cannot be written: '{ancestor}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):  # where atomic_path will create its folders and file
            pass
    except OSError as err:
        raise ConfigError(f"{flag} '{path}' cannot be written: no file can be created in '{ancestor}' "
                          f"({err.strerror or err}); choose another place") from None
    target = _stat_key(path)
    for name, value in (inputs or {}).items():
        if target is None or value is None:
            continue
        for candidate in [value] if isinstance(value, str | os.PathLike) else value:
            if _stat_key(candidate) == target:
                same = "" if Path(candidate) == path else f" '{candidate}'"
                raise ConfigError(f"{flag} '{path}' is {name}{same} (the same file): writing it would destroy that "
                                  f"input; choose another {flag}")
    return path


def other_name(path: PathLike, suffix: str) -> Path:
    """A file name beside ``path`` with ``suffix`` that is not ``path`` itself: for a message that suggests a
    command reading ``path`` and writing a new file (the suggestion must never overwrite its own input)."""
    path = Path(path)
    candidate = path.with_suffix(suffix)
    return candidate if candidate.name != path.name else path.with_name(f"{path.stem}-new{suffix}")


def check_replaceable_folder(path: PathLike, command: str) -> Path:
    """``path`` (symbolic links resolved) if ``command`` may write it as a whole: it does not exist, is empty,
    or holds the ``FOLDER_MARKER`` of ``command``; else a ConfigError saying what is there. Nothing is changed."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"'{path}' is a file, not a folder; {command} writes a folder: choose a new folder name")
    if not path.exists() or not any(path.iterdir()):
        return path
    try:
        owner = json.loads((path / FOLDER_MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner != command:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        found = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        wrote = f"was written by {owner}" if owner else f"was not written by {command} (no {FOLDER_MARKER})"
        raise ConfigError(f"'{path}' already holds files ({found}) and {wrote}; nothing was changed: choose a new "
                          f"or empty folder (or delete this one yourself)")
    return path


@contextlib.contextmanager
def write_folder(path: PathLike, command: str) -> Iterator[Path]:
    """A new empty folder beside ``path`` to fill; when the block ends it gets ``command``'s marker and takes
    ``path``'s place (the folder there is removed); if the block raises, it is removed and ``path`` is as it was.

    ``path`` is checked first (``check_replaceable_folder``): a folder another command or a person filled is
    never touched. The swap is two renames: a kill between them leaves no folder at ``path`` (the next write
    of ``path`` removes both halves). Abandoned temporary folders of earlier writes are removed first.

    Example:
        >>> with write_folder("data/synth", "cgpn synth") as tmp:  # doctest: +SKIP
        ...     (tmp / "query").mkdir()
    """
    path = check_replaceable_folder(path, command)
    prefix, suffix = _temporary_affixes(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    except OSError as err:
        raise ConfigError(f"cannot write the folder '{path}' ({err.strerror or err}); choose another place") from None
    fd = os.open(tmp, os.O_RDONLY)
    try:
        mark_in_progress(fd)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0o700
        yield tmp
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        (tmp / FOLDER_MARKER).write_text(json.dumps({"command": command, "written": stamp}) + "\n")
        check_replaceable_folder(path, command)  # again: a person may have put files there meanwhile
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
            os.replace(path, old)  # onto the empty folder just made
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_folder(path: PathLike, what: str = "folder", hint: str = "choose another folder") -> Iterator[Path]:
    """Hold an exclusive lock on folder ``path`` (made if missing) for the block: a second process (or a
    second call in this one) gets a FolderInUseError naming the holder's pid, host, start time and command.

    The lock is an ``fcntl.flock`` on ``path/LOCK_NAME``, which the kernel releases when the holder exits or
    is killed: no stale lock outlives its process. The file itself stays, with the last holder's details.

    Args:
        path: the folder.
        what: how the user named it (``output_dir``), for the message.
        hint: what to do instead of waiting, for the message.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, new_file_mode())
    except OSError as err:
        raise ConfigError(f"{what} '{path}' is not writable ({err.strerror or err}); {hint}") from None
    try:
        try:
            free = _lock_exclusive(fd)
        except OSError as err:  # a file system without locks: go on, unguarded
            logger.warning("cannot lock %s '%s' (%s): nothing keeps a second process from writing there too",
                           what, path, err.strerror or err)
            free = True
        if not free:
            raise FolderInUseError(f"{what} '{path}' is in use by another process ({_holder(fd)}); wait for it to "
                                   f"end, or {hint}")
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"),
                  "command": _command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path / LOCK_NAME
    finally:
        os.close(fd)


def _command_line() -> str:
    """This process's command line, short: ``cgpn train ...`` also when started as ``python -m cgpn``."""
    program = Path(sys.argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name
    return " ".join([name, *sys.argv[1:]])[:300]


def _holder(fd: int) -> str:
    """Who holds the lock file ``fd``, from what the holder wrote into it."""
    try:
        h = json.loads(os.pread(fd, 4096, 0))
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not written its details yet"


# --- reading -------------------------------------------------------------------------------------------


def _foreign_global(data: bytes) -> str | None:
    """The first Python name a pickle would import that is not a tensor building block (``posix.system``...),
    found by reading its opcodes without running any; None if it names only torch / collections objects."""
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "STACK_GLOBAL"):
                pushed = strings[-2:] if len(strings) >= 2 else ["?", "?"]  # STACK_GLOBAL: module, name pushed
                module, name = arg.split(" ", 1) if op.name == "GLOBAL" else pushed
                if module.split(".")[0] not in ("torch", "collections"):
                    return f"{module}.{name}"
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a damaged pickle: what was read so far is all there is
        return None
    return None


def describe_file(path: PathLike) -> str:
    """What the file at ``path`` looks like, from its first bytes, in a few words ("an ONNX graph", "a Python
    pickle that would import posix.system", "an empty file"): for messages about a file of the wrong kind."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                pickles = [n for n in names if n.endswith("data.pkl")]
                if pickles:
                    code = _foreign_global(z.read(pickles[0]))
                    return (f"a PyTorch file whose pickle would import {code} (Python code, which cgpn never runs)"
                            if code else "a PyTorch file")
        except (zipfile.BadZipFile, OSError, KeyError, RuntimeError):
            return "a truncated or damaged zip archive (a copy or save cut short?)"
        if any(n.endswith(".npy") for n in names):
            return "a NumPy .npz archive"
        return "a zip archive"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        code = _foreign_global(path.read_bytes())
        return f"a Python pickle that would import {code} (Python code, which cgpn never runs)" if code \
            else "a Python pickle, not a PyTorch zip archive"
    signatures = {b"\x93NUMPY": "a NumPy .npy array", b"PAR1": "a Parquet file", b"\x89PNG": "a PNG image",
                  b"\xff\xd8\xff": "a JPEG image", b"\x89HDF": "an HDF5 file", b"MATLAB": "a MATLAB file",
                  b"IxF": "a FAISS index", b"Iw": "a FAISS index"}
    kind = next((v for k, v in signatures.items() if head.startswith(k)), None)
    if kind:
        return kind
    # ONNX is a protobuf ModelProto: field 1 (ir_version, a small varint), then producer_name, graph...
    if head[0] == 0x08 and head[1] < 0x80 and len(head) > 2 and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A):
        return "an ONNX graph"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a format cgpn knows (random or damaged bytes?)"
    return "a text file"


def input_file(path: PathLike, what: str, expected: str, error: type[CgpnError] = ConfigError) -> Path:
    """``path`` as a Path if it names a non-empty file, else ``error`` in one line: it does not exist, it is a
    folder, or it is empty; each names the file and says what was ``expected``."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} '{path}' is a folder, not a file (expected {expected})")
    if not path.exists():
        raise error(f"{what} '{path}' does not exist (expected {expected})")
    if path.stat().st_size == 0:
        raise error(f"{what} '{path}' is empty (0 bytes; a copy or save cut short?); expected {expected}")
    return path


@contextlib.contextmanager
def reading(path: PathLike, what: str, expected: str, error: type[CgpnError] = ConfigError) -> Iterator[Path]:
    """Check ``path`` with ``input_file``, then turn any exception of the block that reads it (a truncated
    archive, garbage bytes, a wrong type inside) into ``error`` naming the file and what it looks like.
    A CgpnError raised in the block passes unchanged.

    Example:
        >>> with reading(path, "features file", "a .npz written by cgpn extract", IndexFileError) as p:
        ...     data = np.load(p)  # doctest: +SKIP
    """
    path = input_file(path, what, expected, error)
    try:
        yield path
    except CgpnError:
        raise
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise error(f"cannot read {what} '{path}' ({reason}): it is {describe_file(path)}; "
                    f"expected {expected}") from None


def load_torch_file(path: PathLike, what: str, expected: str, error: type[CgpnError]) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU. A file torch cannot load that way is ``error`` saying
    what the file is (``describe_file``): torch's own message advises ``weights_only=False``, which would run
    any code a pickle carries, and is never passed on. Torch's warnings (pickle protocol...) are silenced."""
    import torch

    path = input_file(path, what, expected, error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle, zip, EOF and torch errors alike
        raise error(f"{what} '{path}' cannot be loaded: it is {describe_file(path)}; pass {expected} instead") from None
