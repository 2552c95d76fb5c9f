"""What every route of the server stands on: the gallery index (opened read-only), the network that embeds
image queries, the optional folder of query images, and the batchers that serve concurrent requests
together.

A query is searched exactly as ``cgpn search`` searches it: the image decoded to RGB, embedded by the
checkpoint's network with its own preprocessing, then ``GalleryIndex.search``; so the page, the API and
``cgpn search --json`` rank a gallery alike.

Example:
    >>> service = SearchService.open("gallery.faiss")
    >>> hits = asyncio.run(service.search(feature, topk=10))
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import logging
import math
import secrets
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from cgpn.config import ServeSettings
from cgpn.data.loader import read_image
from cgpn.errors import CgpnError, RequestError
from cgpn.extractor import FeatureExtractor, list_images
from cgpn.retrieval import GalleryIndex, parse_market_names
from cgpn.retrieval.exact import batch_bucket, batch_sizes
from cgpn.serve.batching import MicroBatcher, Ticket
from cgpn.serve.models import FeatureQuery, GalleryItem, Health, Hit, ModelInfo

__all__ = ["THUMB_SIZE", "SearchService", "Upload", "torch_thread"]

logger = logging.getLogger(__name__)

THUMB_SIZE = (128, 256)  # (width, height) box of a thumbnail: twice the 64 x 128 it is shown at (sharp on HiDPI)
_FEATURE_CACHE = 1024  # features of gallery / query images kept (a click on a result embeds that image once)
_THUMB_CACHE = 4096  # thumbnails kept (about 8 KB each)

ImageKind = str  # "gallery" | "query": the two lists of files the server serves by number


@dataclass(frozen=True)
class Upload:
    """An uploaded query the page remembers, so that its result pages need no new upload."""

    feature: np.ndarray  # (D,) float32
    thumbnail: bytes  # JPEG
    name: str  # the file name the browser sent (shown, never used to read anything)


def torch_thread() -> ThreadPoolExecutor:
    """The one thread that runs a service's torch work: loading, embedding and searching.

    PyTorch's CPU wheels use libgomp, which gives each thread that starts parallel work a team of its own,
    and once it manages more threads than there are CPUs, lets waiting team members spin only briefly before
    they sleep: each parallel op of a team then waits for a wake-up. On a 2-core Xeon that cost 0.1 ms per
    op: with the work on one thread, a 32-query search of 100,000 x 3072 features took 99-118 ms in the
    server instead of 130-153 (its re-scoring 9 ms instead of 23), 32 clients 230-268 req/s instead of
    177-208 (three interleaved runs)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cgpn-torch")


def _jpeg_thumbnail(image: Image.Image) -> bytes:
    image = image.copy()
    image.thumbnail(THUMB_SIZE, Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


class SearchService:
    """A gallery index and an embedding network, searched by many clients at once.

    Args:
        index: the gallery (loaded with ``GalleryIndex.load(path, mmap=True)`` by ``open``).
        extractor: turns a query image into the network's input (``preprocess``); its ``runtime`` embeds
            batches of them into features of the index's size.
        queries: image files offered as queries on the page (``cgpn serve --queries``).
        settings: limits and sizes (``ServeSettings``).
        executor: the thread that embeds and searches (``torch_thread()``, made here when None; ``open``
            loads the index and the network on it too, so no other thread of the process starts torch work);
            ``close`` shuts it down.
    """

    def __init__(self, index: GalleryIndex, extractor: FeatureExtractor, queries: Sequence[str | Path] = (),
                 settings: ServeSettings | None = None, executor: Executor | None = None) -> None:
        index.check_dim(extractor.feature_dim)
        self.index, self.extractor, self.runtime = index, extractor, extractor.runtime
        self.dim = index.dim
        self.settings = settings or ServeSettings()
        self.files: dict[ImageKind, list[Path]] = {"gallery": [Path(p) for p in index.paths],
                                                   "query": [Path(p) for p in queries]}
        query_ids = parse_market_names(self.files["query"]) if queries else None
        self.ids: dict[ImageKind, tuple[np.ndarray, np.ndarray] | None] = {
            "gallery": None if index.pids is None else (index.pids, index.camids), "query": query_ids}
        self.cameras: list[int] = [] if index.camids is None else sorted(int(c) for c in np.unique(index.camids))
        batch = max(1, min(self.settings.max_batch, extractor.batch_size))
        self._torch = executor or torch_thread()
        self._embedder = MicroBatcher(self._embed_batch, batch, "cgpn-embed", executor=self._torch)
        self._searcher = MicroBatcher(self._search_batch, self.settings.max_batch, "cgpn-search", executor=self._torch)
        self._thumbnail = functools.lru_cache(maxsize=_THUMB_CACHE)(self._make_thumbnail)
        self._masks = functools.lru_cache(maxsize=64)(self._camera_mask)
        self._features: OrderedDict[tuple[ImageKind, int], np.ndarray] = OrderedDict()
        self._uploads: OrderedDict[str, Upload] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, index_path: str | Path, checkpoint: str | Path | None = None, queries: str | Path | None = None,
             settings: ServeSettings | None = None, device: str = "auto", backend: str = "auto",
             batch_size: int = 32, flip: bool | None = None) -> SearchService:
        """Load the index read-only (the file mapped without write access, an exact index's vectors copied once
        into aligned memory) and the network of ``checkpoint`` (a checkpoint or an ONNX file written by ``cgpn
        export``; default: the one the index records), with the settings ``cgpn search`` takes (``flip`` None:
        the source's own)."""
        def load() -> tuple[GalleryIndex, list[Path], FeatureExtractor]:
            index = GalleryIndex.load(index_path, mmap=True)
            # first passes (2-3 s for 100,000 x 3072 features: codes, packed) and the fp32 product's timed operand
            # order made now, for every batch size the searcher can form, not in the first requests
            index.prepare((settings or ServeSettings()).max_batch)
            query_files = list_images(queries) if queries is not None else []
            return index, query_files, FeatureExtractor(index.query_checkpoint(checkpoint), device=device,
                                                        batch_size=batch_size, flip=flip, backend=backend,
                                                        progress=False)

        executor = torch_thread()
        try:
            index, query_files, extractor = executor.submit(load).result()
            return cls(index, extractor, query_files, settings, executor)
        except BaseException:
            executor.shutdown()
            raise

    def close(self) -> None:
        """Stop the batchers' worker threads and the torch thread (after the requests they hold)."""
        self._embedder.close()
        self._searcher.close()
        self._torch.shutdown()

    # --- items ---------------------------------------------------------------------------------------

    def count(self, kind: ImageKind) -> int:
        return len(self.files[kind])

    def check_number(self, kind: ImageKind, number: int) -> int:
        """``number`` if it names an image of ``kind``, else a RequestError (404) saying which exist."""
        count = self.count(kind)
        if not 0 <= number < count:
            what = "gallery id" if kind == "gallery" else "query number"
            where = (f"ids run from 0 to {count - 1}" if count else
                     "the server was started without --queries" if kind == "query" else "the gallery is empty")
            raise RequestError(f"{what} {number} does not exist: {where}", 404)
        return number

    def item(self, kind: ImageKind, number: int) -> GalleryItem:
        """Id, file name, identity and camera of an image of ``kind``."""
        return GalleryItem(**self._item_fields(kind, self.check_number(kind, number)))

    def _item_fields(self, kind: ImageKind, number: int) -> dict:
        ids = self.ids[kind]
        pid, camid = (None, None) if ids is None else (int(ids[0][number]), int(ids[1][number]))
        return {"id": number, "name": self.files[kind][number].name, "pid": pid, "camid": camid}

    def image_file(self, kind: ImageKind, number: int) -> Path:
        """The file of an image of ``kind``, found by its number only (never by a path from a request)."""
        path = self.files[kind][self.check_number(kind, number)]
        if not path.is_file():
            raise RequestError(f"the file of {kind} image {number} ({path.name}) is missing on the server", 404)
        return path

    def thumbnail(self, kind: ImageKind, number: int) -> bytes:
        """A JPEG of at most ``THUMB_SIZE`` of an image of ``kind`` (kept in memory once made)."""
        return self._thumbnail(kind, self.check_number(kind, number))

    def _make_thumbnail(self, kind: ImageKind, number: int) -> bytes:
        return _jpeg_thumbnail(self._read(kind, number))

    def _read(self, kind: ImageKind, number: int) -> Image.Image:
        path = self.image_file(kind, number)
        try:
            return read_image(str(path))
        except CgpnError as err:  # a gallery file that went bad on the server: not the client's fault
            raise RequestError(f"cannot read {kind} image {number} ({path.name}) on the server: {err}", 500) from None

    # --- features ------------------------------------------------------------------------------------

    def embed_ticket(self) -> Ticket:
        """Announce an image to embed soon (an upload being read): concurrent embeddings wait a little for it."""
        return self._embedder.ticket()

    def search_ticket(self) -> Ticket:
        """Announce a search soon (a request being read): concurrent searches wait a little for it."""
        return self._searcher.ticket()

    async def embed(self, image: Image.Image, ticket: Ticket | None = None) -> np.ndarray:
        """The (D,) feature of an RGB image, embedded together with the images of concurrent requests."""
        return await self._embedder.run(image, ticket)

    def _embed_batch(self, images: list[Image.Image]) -> list[np.ndarray]:
        return list(self.runtime(torch.stack([self.extractor.preprocess(image) for image in images])).numpy())

    async def file_feature(self, kind: ImageKind, number: int) -> np.ndarray:
        """The feature of an image of ``kind``, embedded from its file as ``cgpn search --query FILE`` does."""
        key = (kind, self.check_number(kind, number))
        with self._lock:
            if key in self._features:
                self._features.move_to_end(key)
                return self._features[key]
        feature = await self.embed(await run_in_threadpool(self._read, kind, number))
        with self._lock:
            self._features[key] = feature
            while len(self._features) > _FEATURE_CACHE:
                self._features.popitem(last=False)
        return feature

    def query_feature(self, query: FeatureQuery) -> np.ndarray:
        """The checked (D,) float32 feature of a feature query, from its numbers or its base64, or a RequestError
        (422) that says what is wrong."""
        if (query.feature is None) == (query.feature_base64 is None):
            raise RequestError("send the feature in one of 'feature' (numbers) and 'feature_base64' (base64 of its "
                               f"float32 bytes), not {'both' if query.feature is not None else 'neither'}")
        if query.feature is not None:
            return self.check_feature(query.feature)
        try:
            data = base64.b64decode(query.feature_base64, validate=True)
        except (binascii.Error, ValueError) as err:  # ValueError: a character outside ASCII
            raise RequestError(f"feature_base64 is not base64 ({err}): send base64 of the feature's little-endian "
                               f"float32 bytes") from None
        if len(data) != 4 * self.dim:
            raise RequestError(f"feature_base64 holds {len(data)} bytes; this index holds {self.dim}-d features: "
                               f"{4 * self.dim} bytes of little-endian float32")
        return self.check_feature(np.frombuffer(data, dtype="<f4"))

    def check_feature(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """A client's feature as a (D,) float32 array, or a RequestError (422): wrong size, not finite, zero."""
        feature = np.asarray(values, dtype=np.float32)
        if feature.shape != (self.dim,):
            raise RequestError(f"the feature has {feature.size} values; this index holds {self.dim}-d features "
                               f"(a row of cgpn extract's output for the same checkpoint)")
        length = float(np.dot(feature, feature))  # one pass: inf or NaN if any value is (or overflows)
        if not math.isfinite(length) and not np.isfinite(feature).all():
            raise RequestError("the feature holds NaN or infinite values; send finite numbers")
        if length == 0.0 and not np.any(feature):
            raise RequestError("the feature is all zeros: it has no direction to compare; send a real feature")
        return feature

    # --- uploads -------------------------------------------------------------------------------------

    def remember(self, feature: np.ndarray, image: Image.Image, name: str) -> str:
        """Keep an uploaded query (feature and thumbnail) for its result pages; returns its token."""
        token = secrets.token_hex(8)
        upload = Upload(feature, _jpeg_thumbnail(image), name)
        with self._lock:
            self._uploads[token] = upload
            while len(self._uploads) > self.settings.uploads_kept:
                self._uploads.popitem(last=False)
        return token

    def upload(self, token: str) -> Upload:
        """The upload kept under ``token``, or a RequestError (404) when it was never made or was dropped."""
        with self._lock:
            upload = self._uploads.get(token)
        if upload is None:
            raise RequestError(f"no uploaded query '{token[:32]}' on the server (the server keeps the last "
                               f"{self.settings.uploads_kept} and forgets them on restart); upload the image again",
                               404)
        return upload

    # --- search --------------------------------------------------------------------------------------

    def check_search(self, topk: int, camids: Sequence[int] | None) -> frozenset[int] | None:
        """Validate ``topk`` and a camera filter; returns the filter as a set (None: every camera)."""
        if not 1 <= topk <= self.settings.max_topk:
            raise RequestError(f"topk must be between 1 and {self.settings.max_topk}, got {topk}")
        if camids is None:
            return None
        if not self.cameras:
            raise RequestError("this gallery has no camera ids (its file names carry none): leave out the camera "
                               "filter")
        unknown = sorted(set(camids) - set(self.cameras))
        if unknown:
            raise RequestError(f"unknown camera {', '.join(map(str, unknown))}: this gallery has camids "
                               f"{', '.join(map(str, self.cameras))} (counted from 0)")
        if not camids:
            raise RequestError("the camera filter is empty: name at least one camid, or leave it out for all")
        return frozenset(int(c) for c in camids)

    async def search(self, feature: np.ndarray, topk: int, camids: Sequence[int] | None = None,
                     ticket: Ticket | None = None) -> list[Hit]:
        """The ``topk`` nearest gallery images of a (D,) feature, nearest first, from the cameras ``camids``.

        Concurrent searches are done together: one index search for all that wait (per camera filter).
        """
        cameras = self.check_search(topk, camids)
        return await self._searcher.run((self.check_feature(feature), topk, cameras), ticket)

    def _camera_mask(self, cameras: frozenset[int]) -> np.ndarray:
        return np.isin(self.index.camids, list(cameras))

    def _search_batch(self, items: list[tuple[np.ndarray, int, frozenset[int] | None]]) -> list[list[Hit]]:
        groups: dict[frozenset[int] | None, list[int]] = defaultdict(list)
        for i, (_, _, cameras) in enumerate(items):
            groups[cameras].append(i)
        out: list[list[Hit]] = [[] for _ in items]
        for cameras, members in groups.items():
            k = max(items[i][1] for i in members)  # each query's top k is the prefix of its top max(k)
            allowed = None if cameras is None else self._masks(cameras)
            scores, rows = self.index.search(np.stack([items[i][0] for i in members]), k, allowed=allowed)
            for j, i in enumerate(members):
                out[i] = self._hits(scores[j, :items[i][1]], rows[j, :items[i][1]])
        return out

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        hits = []
        for score, row in zip(scores.tolist(), rows.tolist()):
            if row < 0:
                break
            hits.append(Hit.model_construct(  # our own values, of the model's types: not validated again
                **self._item_fields("gallery", row), rank=len(hits) + 1, score=round(score, 6),
                distance=round(math.sqrt(max(0.0, 2.0 - 2.0 * score)), 6)))
        return hits

    # --- status --------------------------------------------------------------------------------------

    def health(self) -> Health:
        rt = self.runtime
        model = ModelInfo(checkpoint=rt.checkpoint.name if rt.checkpoint else "(in memory)",
                          name=f"{rt.config.model.name}/{rt.config.model.backbone}", input_size=list(rt.input_shape),
                          backend=rt.backend, device=str(rt.device))
        return Health(gallery_size=len(self.index), dim=self.dim, index_kind=self.index.settings.kind,
                      first_pass=first.name if (first := self.index.first_pass()) else None,
                      first_pass_by_batch={str(batch_bucket(b)): first.name if (first := self.index.first_pass(b)) else None
                                           for b in batch_sizes(self.settings.max_batch)},
                      cameras=self.cameras, queries=self.count("query"), max_topk=self.settings.max_topk,
                      model=model, searches=self._searcher.items, search_batches=self._searcher.calls,
                      search_seconds=round(self._searcher.seconds, 6),
                      searches_waiting=self._searcher.waiting)
