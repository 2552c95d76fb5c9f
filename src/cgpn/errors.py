"""Errors a user can cause. Each says, in one line, what was expected, what was found and what to do.

The CLI prints ``str(err)`` and exits with status 2; tracebacks are shown only with ``--debug``.
"""

from __future__ import annotations

__all__ = [
    "CgpnError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DependencyError",
    "FolderInUseError",
    "ImageError",
    "IndexFileError",
    "OnnxCheckError",
    "PretrainedWeightsError",
    "RequestError",
    "TrainingDivergedError",
]


class CgpnError(Exception):
    """Base class of every user-facing error in cgpn."""

    exit_code = 2


class ConfigError(CgpnError):
    """A config file, key or value that is not valid."""


class DatasetError(CgpnError):
    """A data folder, split file or file name that does not match the expected layout."""


class ImageError(CgpnError):
    """An image file that cannot be decoded."""


class CheckpointError(CgpnError):
    """A checkpoint that is missing, corrupt, or of another model."""


class PretrainedWeightsError(CgpnError):
    """ImageNet weights that cannot be downloaded or loaded."""


class DependencyError(CgpnError):
    """An optional package (faiss, onnxruntime, pyarrow) that a command needs but that is not installed."""


class IndexFileError(CgpnError):
    """A gallery index or features file that is missing, corrupt, or does not fit the query features."""


class TrainingDivergedError(CgpnError):
    """A loss term became NaN or infinite; the run stopped before the bad update. ``what``: which term and
    when, in a few words (the message adds what was kept and what to try)."""

    def __init__(self, message: str, what: str = "") -> None:
        super().__init__(message)
        self.what = what or message


class FolderInUseError(ConfigError):
    """An output folder another process is writing (``cgpn.files.lock_folder``)."""


class OnnxCheckError(CgpnError):
    """An exported graph that onnxruntime does not run as PyTorch does (the file is not written)."""

    exit_code = 1


class RequestError(CgpnError):
    """A request to ``cgpn serve`` that cannot be answered (a bad upload, feature, id or setting).

    Args:
        message: the one line the client sees.
        status: the HTTP status of the answer (4xx).
    """

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status
