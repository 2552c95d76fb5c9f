"""A searchable gallery: FAISS inner-product index over L2-normalised features, so scores are cosines.

``flat`` is exact: a brute-force ``queries @ gallery.T`` done as one matrix multiply per batch of queries
(PyTorch's BLAS; FAISS's own flat kernel ran 10x slower on 32 queries on a 2-core AVX-512 CPU), on a large
gallery from an int8 or bf16 first pass with a proven error bound (``retrieval.exact``); ``ivf`` (inverted lists) and ``ivfpq``
(inverted lists + product quantisation, ``pq_m`` codes of ``pq_bits`` bits per feature) are approximate and scale to
galleries of millions. The index file (``gallery.faiss``) is the FAISS index followed by its metadata: the image
paths, pids / camids when known, the feature size and the checkpoint that made them (see ``GalleryIndex.save``).

Example:
    >>> index = GalleryIndex.build(load_features("feats.npz"))
    >>> index.save("gallery.faiss")
    >>> scores, rows = GalleryIndex.load("gallery.faiss").search(query_features, topk=10)
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cgpn.config import FIRST_PASSES, INDEX_KINDS, IndexSettings
from cgpn.errors import ConfigError, DependencyError, IndexFileError
from cgpn.files import atomic_path, describe_file, other_name, reading
from cgpn.retrieval.exact import (
    Bf16FirstPass,
    FirstPass,
    Int8FirstPass,
    batch_bucket,
    batch_sizes,
    exact_search,
    fastest_first_pass,
    gallery_first_is_faster,
)
from cgpn.retrieval.features import FeatureFile

__all__ = ["INDEX_KINDS", "GalleryIndex", "IndexSettings", "import_faiss"]

logger = logging.getLogger(__name__)

FORMAT = "cgpn-index-v2"
TRAILER = struct.Struct("<Q8s")  # the last 16 bytes of an index file: length of the metadata JSON, MAGIC
MAGIC = b"CGPN-IDX"
FIRST_PASS_KINDS = {kind.name: kind for kind in (Int8FirstPass, Bf16FirstPass)}  # auto without timing tries them
# in this order: the faster first on the CPUs measured without AMX (benchmarks/serve_load.py)


def import_faiss():
    """The ``faiss`` module, or a DependencyError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise DependencyError("faiss is not installed (needed for cgpn index / search); install it with: "
                              "pip install faiss-cpu  (or faiss-gpu on a CUDA machine)") from None
    return faiss


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
        self._first_passes: dict[str, FirstPass] = {}  # made at first use
        self._fastest: dict[int, str | None] = {}  # batch size bucket -> the first pass auto takes (None: fp32),
        # timed by prepare
        self._copied: tuple[Any, torch.Tensor] | None = None  # (faiss index, its vectors copied into aligned memory)
        if settings.first_pass not in FIRST_PASSES:
            raise ConfigError(f"--first-pass must be one of {', '.join(FIRST_PASSES)}, got '{settings.first_pass}'")
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
        """Write the index to ``path`` as one file: the FAISS index, its metadata as JSON (paths, ids, settings,
        checkpoint, the index part's size), then the JSON's length and ``MAGIC``.

        One file rather than an index and a sidecar: ``atomic_path`` replaces it with one rename, so whenever a
        writer is killed, a reader finds the old index with its own metadata or the new one with its own, never
        a mix (two files cannot be renamed at once). ``faiss.read_index`` still reads the index part.
        """
        faiss = import_faiss()
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
            meta = {"format": FORMAT, "dim": self.dim, "count": len(self), "checkpoint": self.checkpoint,
                    "metric": "inner_product", "settings": asdict(self.settings), "paths": self.paths,
                    "pids": None if self.pids is None else self.pids.tolist(),
                    "camids": None if self.camids is None else self.camids.tolist(),
                    "index_bytes": tmp.stat().st_size}
            blob = json.dumps(meta).encode()
            with tmp.open("ab") as f:
                f.write(blob + TRAILER.pack(len(blob), MAGIC))
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False) -> GalleryIndex:
        """Read an index written by ``save``; anything else (missing, truncated, another kind of file, an
        index of an older cgpn) is an IndexFileError naming the file and what to do.

        Args:
            path: the index file.
            mmap: map the file read-only instead of reading it (what a server wants: no way to write to the
                file; FAISS does not copy the index). An exact index's vectors are copied from the mapping into
                aligned memory at their first use (see ``_vectors``).
        """
        faiss = import_faiss()
        path = Path(path)
        expected = (f"an index written by cgpn index build (e.g. cgpn index build --features "
                    f"{other_name(path, '.npz')} --out {path})")
        with reading(path, "index", expected, IndexFileError):
            size = path.stat().st_size
            with path.open("rb") as f:
                f.seek(max(0, size - TRAILER.size))
                tail = f.read(TRAILER.size)
                length, magic = TRAILER.unpack(tail) if len(tail) == TRAILER.size else (0, b"")
                if magic != MAGIC or length > size - TRAILER.size:
                    raise IndexFileError(cls._not_an_index(path, expected))
                f.seek(size - TRAILER.size - length)
                meta = json.loads(f.read(length))
            index_bytes = size - TRAILER.size - length
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("index_bytes") != index_bytes:
                raise IndexFileError(f"index '{path}' is damaged (its metadata does not describe it); rebuild it "
                                     f"with cgpn index build")
            if mmap:  # FAISS reads the index from the start of the file; the metadata after it is not its concern
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            else:
                index = faiss.deserialize_index(np.memmap(path, dtype=np.uint8, mode="r", shape=(index_bytes,)))
            if index.d != meta["dim"] or index.ntotal != len(meta["paths"]):
                raise IndexFileError(f"index '{path}' ({index.ntotal} x {index.d}) does not match its metadata "
                                     f"({len(meta['paths'])} paths x {meta['dim']}); rebuild it with cgpn index build")
            settings = IndexSettings(**meta["settings"])
            ids = [None if meta[k] is None else np.asarray(meta[k], dtype=np.int64) for k in ("pids", "camids")]
            return cls(index, meta["paths"], ids[0], ids[1], meta.get("checkpoint", ""), settings)

    @staticmethod
    def _not_an_index(path: Path, expected: str) -> str:
        """Why ``path`` is not an index, and what to run instead (never writing over ``path`` itself)."""
        kind = describe_file(path)
        if path.with_name(path.name + ".json").is_file() and kind == "a FAISS index":
            return (f"index '{path}' was written by an older cgpn (an index and a separate {path.name}.json); "
                    f"rebuild it with cgpn index build")
        if kind in ("a NumPy .npz archive", "a Parquet file"):
            return (f"'{path}' is a features file, not an index; build an index from it with: cgpn index build "
                    f"--features {path} --out {other_name(path, '.faiss')}")
        return f"'{path}' is not a cgpn index: it is {kind}; expected {expected}"

    def to_gpu(self) -> bool:
        """Move the index to all GPUs when this FAISS build has GPU support and sees a GPU; True if moved."""
        faiss = import_faiss()
        if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
            return False
        self.index = faiss.index_cpu_to_all_gpus(self.index)
        return True

    def query_checkpoint(self, checkpoint: str | Path | None = None) -> str:
        """The checkpoint to embed queries with: ``checkpoint`` if given (with a warning when the index's
        features came from another), else the one the index records; a ConfigError if neither is known."""
        if checkpoint and self.checkpoint and Path(checkpoint).resolve() != Path(self.checkpoint).resolve():
            logger.warning("the index holds features of %s; embedding the queries with %s instead: the scores mean "
                           "something only if both networks are the same", self.checkpoint, checkpoint)
        if not (checkpoint or self.checkpoint):
            raise ConfigError("the index does not name the checkpoint its features came from; pass --checkpoint C "
                              "(the one given to cgpn extract)")
        return str(checkpoint or self.checkpoint)

    def check_dim(self, dim: int) -> None:
        """An IndexFileError unless query features of size ``dim`` fit this index."""
        if dim != self.dim:
            raise IndexFileError(f"the index holds {self.dim}-d features but the query features are {dim}-d; "
                                 f"build the index with features of the same checkpoint (or model.name)")

    def search(self, queries: np.ndarray, topk: int = 10,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k): cosine similarities, highest first, and gallery rows (-1: none).

        Args:
            queries: (Q, D) features (re-normalised here), D the index's feature size.
            topk: results per query (at most the gallery size).
            allowed: (N,) bool, the gallery rows a result may come from (None: all). Applied before
                ranking: the results are the k nearest allowed rows (fewer if fewer are allowed).
        """
        queries = np.asarray(queries, dtype=np.float32)
        self.check_dim(queries.shape[-1] if queries.ndim == 2 else -1)
        if topk < 1:
            raise ConfigError(f"--topk must be at least 1, got {topk}")
        if allowed is not None and np.shape(allowed) != (len(self),):
            raise ConfigError(f"allowed must be one bool per gallery row ({len(self)}), got shape {np.shape(allowed)}")
        k = min(topk, len(self))
        vectors = self._vectors()
        if vectors is not None:
            return exact_search(vectors, _normalized(queries), k, allowed, self.first_pass(len(queries)))
        params = None
        if allowed is not None:
            faiss = import_faiss()
            selector = faiss.IDSelectorBitmap(np.packbits(np.asarray(allowed, dtype=bool), bitorder="little"))
            params = (faiss.SearchParameters(sel=selector) if self.settings.kind == "flat" else
                      faiss.SearchParametersIVF(sel=selector, nprobe=self.settings.nprobe))
        return self.index.search(_normalized(queries), k, params=params)

    def first_pass(self, queries: int = 1) -> FirstPass | None:
        """The first pass an exact search of ``queries`` queries takes (``settings.first_pass``), or None: an fp32
        pass, or not an exact index. auto, for galleries of 2^24+ values: the fastest for this batch size where
        ``prepare`` timed them, else int8 on CPUs with int8 dot products, else bf16 on CPUs with native bf16 and
        for 1-2 queries elsewhere. Made at the first use (1 or 2 bytes per stored value); one whose self-check
        failed (``usable`` False) leaves the search fp32."""
        vectors = self._vectors()
        mode = self.settings.first_pass
        if vectors is None or mode == "off":
            return None
        if mode != "auto":
            return self._first_pass(mode, vectors)
        if self._fastest:
            name = self._fastest.get(batch_bucket(queries), self._fastest[max(self._fastest)])
            return None if name is None else self._first_passes[name]
        for name, kind in FIRST_PASS_KINDS.items():
            if kind.pays(vectors, queries) and (found := self._first_pass(name, vectors)).usable:
                return found
        return None

    def prepare(self, max_queries: int) -> None:
        """Make now what exact searches of up to ``max_queries`` queries use, so that no request waits for it:
        the fp32 product's operand order and, for ``first_pass=auto``, the fastest of the fp32 pass and the first
        passes that can pay here, each timed per batch size bucket (1, 2, 4, ...). A server calls it at start."""
        vectors = self._vectors()
        if vectors is None:
            return
        start = time.perf_counter()
        for count in batch_sizes(max_queries):
            gallery_first_is_faster(vectors, count)
            if self.settings.first_pass == "auto":
                kinds = [name for name, kind in FIRST_PASS_KINDS.items() if kind.pays(vectors, count)]
                found = fastest_first_pass(vectors, [self._first_pass(name, vectors) for name in kinds], count)
                self._fastest[batch_bucket(count)] = found.name if found is not None else None
            else:
                self.first_pass(count)
        if self._fastest and any(self._fastest.values()):
            logger.info("exact search, queries at once: first pass (the fastest, timed in %.1f s): %s",
                        time.perf_counter() - start,
                        ", ".join(f"{b} {name or 'fp32'}" for b, name in sorted(self._fastest.items())))

    def _first_pass(self, name: str, vectors: torch.Tensor) -> FirstPass:
        if name not in self._first_passes:
            self._first_passes[name] = FIRST_PASS_KINDS[name](vectors)
        return self._first_passes[name]

    def _vectors(self) -> torch.Tensor | None:
        """(N, D) fp32 view of an exact index's stored vectors, or None for an approximate or GPU index. Vectors
        mapped from the file start at its byte 45, where no fp32 value is 4-byte aligned: those are copied once
        into aligned memory (the file stays mapped read-only), which a search reads 1.3-2.8x faster (2-core AMD
        EPYC, 100,000 x 3072, fp32 pass: 1 / 4 / 32 queries 106 / 249 / 312 ms mapped, 80 / 88 / 280 copied)."""
        if self._copied is not None and self._copied[0] is self.index:
            return self._copied[1]
        if not hasattr(self.index, "get_xb") or len(self) == 0:
            return None
        flat = import_faiss().rev_swig_ptr(self.index.get_xb(), len(self) * self.dim)
        vectors = torch.from_numpy(flat).view(len(self), self.dim)
        if vectors.data_ptr() % vectors.element_size():
            vectors = vectors.clone()  # torch's allocations are 64-byte aligned
            self._copied = (self.index, vectors)
        return vectors
