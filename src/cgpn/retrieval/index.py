"""A searchable gallery: FAISS inner-product index over L2-normalised features, so scores are cosines.

``flat`` is exact (what a brute-force ``gallery @ query`` gives); ``ivf`` (inverted lists) and ``ivfpq``
(inverted lists + product quantisation, ``pq_m`` codes of ``pq_bits`` bits per feature) are approximate and scale to
galleries of millions. The index file (``gallery.faiss``) has a JSON sidecar (``gallery.faiss.json``)
with the image paths, pids / camids when known, the feature size and the checkpoint that made them.

Example:
    >>> index = GalleryIndex.build(load_features("feats.npz"))
    >>> index.save("gallery.faiss")
    >>> scores, rows = GalleryIndex.load("gallery.faiss").search(query_features, topk=10)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cgpn.config import INDEX_KINDS, IndexSettings
from cgpn.errors import ConfigError, DependencyError, IndexFileError
from cgpn.files import atomic_path
from cgpn.retrieval.features import FeatureFile

__all__ = ["INDEX_KINDS", "GalleryIndex", "IndexSettings", "import_faiss", "sidecar_path"]

logger = logging.getLogger(__name__)

FORMAT = "cgpn-index-v1"


def import_faiss():
    """The ``faiss`` module, or a DependencyError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise DependencyError("faiss is not installed (needed for cgpn index / search); install it with: "
                              "pip install faiss-cpu  (or faiss-gpu on a CUDA machine)") from None
    return faiss


def sidecar_path(index_path: str | Path) -> Path:
    """The JSON file beside an index that names its images: ``gallery.faiss`` -> ``gallery.faiss.json``."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".json")


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class GalleryIndex:
    """A FAISS index with the paths (and pids / camids) of the images whose features it holds."""

    def __init__(self, index: Any, paths: list[str], pids: np.ndarray | None, camids: np.ndarray | None,
                 checkpoint: str, settings: IndexSettings) -> None:
        self.index, self.paths, self.pids, self.camids = index, paths, pids, camids
        self.checkpoint, self.settings = checkpoint, settings
        if settings.kind != "flat":  # on the CPU index, before any to_gpu (GPU clones copy it)
            if settings.nprobe < 1:
                raise ConfigError(f"--nprobe must be at least 1, got {settings.nprobe}")
            import_faiss().extract_index_ivf(index).nprobe = settings.nprobe

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, data: FeatureFile, settings: IndexSettings | None = None) -> GalleryIndex:
        """Index ``data.features`` (re-normalised to unit length, so inner product = cosine)."""
        faiss = import_faiss()
        s = settings or IndexSettings()
        n, d = data.features.shape
        if n == 0:
            raise IndexFileError("the features file holds no feature; extract some with cgpn extract first")
        if s.kind == "flat":
            spec = "Flat"
        elif s.kind in ("ivf", "ivfpq"):
            if not 1 <= s.nlist <= n:
                raise ConfigError(f"--nlist must be between 1 and the number of gallery features ({n}), "
                                  f"got {s.nlist}; e.g. --nlist {max(1, int(np.sqrt(n)))}")
            spec = f"IVF{s.nlist},Flat"
            if s.kind == "ivfpq":
                if not 1 <= s.pq_bits <= 16:
                    raise ConfigError(f"--pq-bits must be between 1 and 16, got {s.pq_bits} (8 is usual)")
                if s.pq_m < 1 or d % s.pq_m:
                    raise ConfigError(f"--pq-m must divide the feature size {d}, got {s.pq_m} (e.g. --pq-m 64)")
                if n < 2 ** s.pq_bits:
                    raise ConfigError(f"ivfpq with --pq-bits {s.pq_bits} needs at least {2 ** s.pq_bits} gallery "
                                      f"features to train, got {n}; use --kind ivf or flat")
                spec = f"IVF{s.nlist},PQ{s.pq_m}x{s.pq_bits}"
        else:
            raise ConfigError(f"--kind must be one of {', '.join(INDEX_KINDS)}, got '{s.kind}'")
        feats = _normalized(data.features)
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            logger.info("training the %s index on %d features", spec, n)
            index.train(feats)
        index.add(feats)
        return cls(index, list(data.paths), data.pids, data.camids, data.checkpoint, s)

    def save(self, path: str | Path) -> Path:
        """Write the index to ``path`` and its sidecar (paths, ids, settings, index size) to ``path.json``.

        Both are written in full under temporary names first and renamed one right after the other, so a
        kill leaves the old pair or the new one; the sidecar records the index file's size, checked by
        ``load``.
        """
        faiss = import_faiss()
        path = Path(path)
        with atomic_path(path) as tmp_index, atomic_path(sidecar_path(path)) as tmp_side:
            faiss.write_index(self.index, str(tmp_index))
            meta = {"format": FORMAT, "dim": self.dim, "count": len(self), "checkpoint": self.checkpoint,
                    "metric": "inner_product", "settings": asdict(self.settings), "paths": self.paths,
                    "pids": None if self.pids is None else self.pids.tolist(),
                    "camids": None if self.camids is None else self.camids.tolist(),
                    "index_bytes": tmp_index.stat().st_size}
            tmp_side.write_text(json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> GalleryIndex:
        """Read an index written by ``save`` and check that it agrees with its sidecar."""
        faiss = import_faiss()
        path, side = Path(path), sidecar_path(path)
        for p in (path, side):
            if not p.is_file():
                raise IndexFileError(f"index file '{p}' does not exist (build one with: cgpn index build "
                                     f"--features feats.npz --out {path.name})")
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as err:
            raise IndexFileError(f"cannot read index sidecar '{side}': {err}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise IndexFileError(f"'{side}' is not a cgpn index sidecar (no '{FORMAT}' marker)")
        if meta.get("index_bytes", path.stat().st_size) != path.stat().st_size:
            raise IndexFileError(f"index '{path}' ({path.stat().st_size} bytes) is not the file its sidecar "
                                 f"describes ({meta['index_bytes']} bytes); rebuild it with cgpn index build")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise IndexFileError(f"cannot read FAISS index '{path}': {str(err).strip().splitlines()[-1]}") from None
        if index.d != meta["dim"] or index.ntotal != len(meta["paths"]):
            raise IndexFileError(f"index '{path}' ({index.ntotal} x {index.d}) does not match its sidecar "
                                 f"({len(meta['paths'])} paths x {meta['dim']}); rebuild it with cgpn index build")
        settings = IndexSettings(**meta["settings"])
        ids = [None if meta[k] is None else np.asarray(meta[k], dtype=np.int64) for k in ("pids", "camids")]
        return cls(index, meta["paths"], ids[0], ids[1], meta.get("checkpoint", ""), settings)

    def to_gpu(self) -> bool:
        """Move the index to all GPUs when this FAISS build has GPU support and sees a GPU; True if moved."""
        faiss = import_faiss()
        if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
            return False
        self.index = faiss.index_cpu_to_all_gpus(self.index)
        return True

    def check_dim(self, dim: int) -> None:
        """An IndexFileError unless query features of size ``dim`` fit this index."""
        if dim != self.dim:
            raise IndexFileError(f"the index holds {self.dim}-d features but the query features are {dim}-d; "
                                 f"build the index with features of the same checkpoint (or model.name)")

    def search(self, queries: np.ndarray, topk: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k): cosine similarities, highest first, and gallery rows (-1: none).

        Args:
            queries: (Q, D) features (re-normalised here), D the index's feature size.
            topk: results per query (at most the gallery size).
        """
        queries = np.asarray(queries, dtype=np.float32)
        self.check_dim(queries.shape[-1] if queries.ndim == 2 else -1)
        if topk < 1:
            raise ConfigError(f"--topk must be at least 1, got {topk}")
        return self.index.search(_normalized(queries), min(topk, len(self)))
