"""Feature files: what ``cgpn extract`` writes and ``cgpn index build`` reads.

A ``.npz`` holds ``paths`` (N,), ``features`` (N, D) float32 (L2-normalised), and ``pids`` / ``camids``
(N,) when every file name carries them in Market-1501 style (``0002_c1s1_000451_00.jpg``; camids from
0, as in the data sets), plus the checkpoint that produced them. ``.parquet`` holds the same as
columns (``path``, ``pid``, ``camid``, ``feature``), the checkpoint in the schema metadata.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cgpn.errors import ConfigError, DependencyError, IndexFileError
from cgpn.files import atomic_path, describe_file, other_name, reading

__all__ = ["FORMATS", "FeatureFile", "import_pyarrow", "load_features", "parse_market_names", "save_features"]

FORMAT = "cgpn-features-v1"
FORMATS = ("npz", "parquet")
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


@dataclass
class FeatureFile:
    """Features of a list of images, with their identities and cameras when known."""

    paths: list[str]
    features: np.ndarray  # (N, D) float32
    pids: np.ndarray | None = None  # (N,) int64
    camids: np.ndarray | None = None  # (N,) int64, cameras counted from 0
    checkpoint: str = ""  # the checkpoint that produced the features ("" if unknown)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 2 or len(self.features) != len(self.paths):
            raise IndexFileError(f"features must be (N, D) with one row per path, got shape {self.features.shape} "
                                 f"for {len(self.paths)} paths")
        if (self.pids is None) != (self.camids is None):
            raise IndexFileError("pids and camids come together: give both or neither")
        if self.pids is not None:
            self.pids, self.camids = (np.asarray(a, dtype=np.int64) for a in (self.pids, self.camids))
            if self.pids.shape != (len(self.paths),) or self.camids.shape != (len(self.paths),):
                raise IndexFileError(f"pids and camids must hold one value per path ({len(self.paths)}), got "
                                     f"shapes {self.pids.shape} and {self.camids.shape}")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def parse_market_names(paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray] | None:
    """(pids, camids from 0) if every file name starts Market-style (``{pid}_c{cam}``), else None."""
    matches = [_MARKET_NAME.match(Path(p).name) for p in paths]
    if not matches or any(m is None or int(m.group(2)) < 1 for m in matches):
        return None
    return (np.array([int(m.group(1)) for m in matches], dtype=np.int64),
            np.array([int(m.group(2)) - 1 for m in matches], dtype=np.int64))


def import_pyarrow():
    """The ``pyarrow`` module (with ``pyarrow.parquet``), or a DependencyError saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DependencyError("pyarrow is not installed (needed for --format parquet); install it with: "
                              "pip install pyarrow, or write .npz with --format npz") from None
    return pyarrow


def save_features(data: FeatureFile, out: str | Path, fmt: str = "npz") -> Path:
    """Write ``data`` to ``out`` as ``npz`` or ``parquet``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out)
    if fmt == "npz":
        extra = {} if data.pids is None else {"pids": data.pids, "camids": data.camids}
        with atomic_path(out) as tmp, tmp.open("wb") as f:  # a file object: np.savez would append .npz
            np.savez(f, format=np.array(FORMAT), paths=np.array(data.paths, dtype=str), features=data.features,
                     checkpoint=np.array(data.checkpoint), **extra)
        return out
    pa = import_pyarrow()
    columns = {"path": pa.array(data.paths, pa.string())}
    if data.pids is not None:
        columns["pid"], columns["camid"] = pa.array(data.pids, pa.int64()), pa.array(data.camids, pa.int64())
    columns["feature"] = pa.FixedSizeListArray.from_arrays(pa.array(data.features.ravel(), pa.float32()), data.dim)
    table = pa.table(columns).replace_schema_metadata({"format": FORMAT, "checkpoint": data.checkpoint})
    with atomic_path(out) as tmp:
        pa.parquet.write_table(table, tmp)
    return out


def load_features(path: str | Path) -> FeatureFile:
    """Read a feature file written by ``save_features``, .npz or .parquet (told apart by content, not name);
    anything else (missing, empty, truncated, another kind of file) is an IndexFileError naming it."""
    path = Path(path)
    with reading(path, "features file", "a .npz or .parquet written by cgpn extract (e.g. cgpn extract "
                 "--checkpoint C --images DIR --out feats.npz)", IndexFileError):
        with path.open("rb") as f:
            magic = f.read(4)
        if magic not in (b"PAR1", b"PK\x03\x04"):  # parquet, or a zip archive (.npz)
            raise IndexFileError(f"'{path}' is not a features file: it is {describe_file(path)} (expected a .npz "
                                 f"or .parquet written by cgpn extract)")
        if magic == b"PAR1":
            return _load_parquet(path)
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != FORMAT:
                raise IndexFileError(f"'{path}' is not a cgpn features file (no '{FORMAT}' marker); "
                                     f"write one with cgpn extract --out {other_name(path, '.npz')}")
            return FeatureFile([str(p) for p in z["paths"]], z["features"], z.get("pids"),
                               z.get("camids"), str(z["checkpoint"]))


def _load_parquet(path: Path) -> FeatureFile:
    pa = import_pyarrow()
    table = pa.parquet.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("format") != FORMAT:
        raise IndexFileError(f"'{path}' is not a cgpn features file (no '{FORMAT}' marker); "
                             f"write one with cgpn extract --format parquet --out {other_name(path, '.parquet')}")
    feats = np.asarray(table.column("feature").combine_chunks().flatten(), dtype=np.float32)
    n = table.num_rows
    has_ids = "pid" in table.column_names
    return FeatureFile(table.column("path").to_pylist(), feats.reshape(n, -1 if n else 0),
                       np.asarray(table.column("pid")) if has_ids else None,
                       np.asarray(table.column("camid")) if has_ids else None, meta.get("checkpoint", ""))
