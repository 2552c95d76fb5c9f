"""cgpn serve without a browser: the JSON API and the pages through FastAPI's TestClient, checked against
``cgpn search --json`` and a NumPy brute-force search of the features file; every bad request of an unlucky
user; the files it must not touch; the command line."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import cgpn.serve
from cgpn.config import ServeSettings
from cgpn.extractor import FeatureExtractor
from cgpn.retrieval import GalleryIndex
from cgpn.serve import SearchService, create_app
from cgpn.serve.batching import MicroBatcher
from serve_helpers import Gallery, cli, cli_search, error_line, make_gallery, serve_process

PER_PAGE = 5  # small pages: the 24-image tiny gallery has several
MAX_UPLOAD_MB = 0.25


@pytest.fixture(scope="module")
def gallery(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    return make_gallery(tiny_synth, tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module")
def ref(gallery: Gallery) -> dict[str, np.ndarray]:
    """What cgpn extract wrote: the reference every search is checked against."""
    with np.load(gallery.features) as z:
        return {k: z[k] for k in ("paths", "features", "pids", "camids")}


@pytest.fixture(scope="module")
def service(gallery: Gallery) -> SearchService:
    settings = ServeSettings(per_page=PER_PAGE, max_upload_mb=MAX_UPLOAD_MB)
    return SearchService.open(gallery.index, queries=gallery.queries, settings=settings, device="cpu",
                              backend="eager")


@pytest.fixture(scope="module")
def client(service: SearchService) -> TestClient:
    with TestClient(create_app(service)) as c:
        yield c


def brute_force(ref: dict[str, np.ndarray], query: np.ndarray, k: int, camids: list[int] | None = None
                ) -> tuple[list[int], np.ndarray]:
    """(gallery rows, scores) of the k largest cosines over the allowed cameras, by NumPy over the features file."""
    q = query / np.linalg.norm(query)
    g = ref["features"] / np.linalg.norm(ref["features"], axis=1, keepdims=True)
    scores = g @ q
    rows = [int(i) for i in np.argsort(-scores, kind="stable") if camids is None or ref["camids"][i] in camids]
    return rows[:k], scores[rows[:k]]


def _jpeg(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def _png(mode: str, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


# --- ranking -------------------------------------------------------------------------------------------


def test_image_search_ranks_as_cgpn_search_json(client: TestClient, gallery: Gallery, ref: dict,
                                                capsys: pytest.CaptureFixture) -> None:
    """The same image uploaded to the API and given to ``cgpn search --json``: the same ranked list."""
    for query in sorted(gallery.queries.glob("*.jpg"))[:6]:
        answer = client.post("/api/search", files={"image": _jpeg(query)}, data={"topk": "10"})
        assert answer.status_code == 200, answer.text
        api_hits = answer.json()["results"]
        cli_hits = cli_search(capsys, gallery, query, 10)
        assert [str(ref["paths"][h["id"]]) for h in api_hits] == [h["path"] for h in cli_hits]
        np.testing.assert_allclose([h["score"] for h in api_hits], [h["score"] for h in cli_hits], atol=1e-5)
        assert [(h["pid"], h["camid"]) for h in api_hits] == [(h["pid"], h["camid"]) for h in cli_hits]
        assert [h["rank"] for h in api_hits] == list(range(1, 11))


@pytest.mark.parametrize("camids", [None, [0], [1, 2]])
def test_feature_search_equals_brute_force(client: TestClient, ref: dict, camids: list[int] | None) -> None:
    rng = np.random.default_rng(0)
    for query in (ref["features"][3], rng.normal(size=ref["features"].shape[1])):
        answer = client.post("/api/search", json={"feature": query.tolist(), "topk": 7, "camids": camids})
        assert answer.status_code == 200, answer.text
        hits = answer.json()["results"]
        rows, scores = brute_force(ref, query, 7, camids)
        assert [h["id"] for h in hits] == rows
        as_bytes = client.post("/api/search", json={"feature_base64": _b64(query), "topk": 7, "camids": camids})
        assert as_bytes.status_code == 200, as_bytes.text
        assert [h["id"] for h in as_bytes.json()["results"]] == rows
        np.testing.assert_allclose([h["score"] for h in as_bytes.json()["results"]], scores, atol=1e-5)
        np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-5)
        unit = query / np.linalg.norm(query)  # distance: Euclidean between the unit vectors, computed here
        g = ref["features"][rows] / np.linalg.norm(ref["features"][rows], axis=1, keepdims=True)
        np.testing.assert_allclose([h["distance"] for h in hits], np.linalg.norm(g - unit, axis=1), atol=1e-4)
        assert all(h["camid"] in camids for h in hits) if camids else True
        assert [h["name"] for h in hits] == [Path(str(ref["paths"][i])).name for i in rows]


def test_concurrent_queries_are_searched_together_and_exactly(service: SearchService, ref: dict,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """32 clients at once, while the index is busy: they are searched in one batch (one index search per
    camera filter, 4 here, not 32), and each gets its own exact ranking."""
    calls: list[int] = []
    search = service.index.search

    def spy(queries: np.ndarray, topk: int, allowed: np.ndarray | None = None):
        calls.append(len(queries))
        deadline = time.monotonic() + 60
        while len(calls) == 1 and service.health().searches_waiting < 32 and time.monotonic() < deadline:
            time.sleep(0.01)  # the first search holds the index until all 32 clients wait
        return search(queries, topk, allowed)

    monkeypatch.setattr(service.index, "search", spy)
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(33, ref["features"].shape[1]))
    filters = [None if i % 4 else [i % 3] for i in range(32)]

    async def run() -> list[httpx.Response]:
        busy = asyncio.ensure_future(service.search(queries[32], 1))
        while not calls:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            answers = await asyncio.gather(*(c.post("/api/search", json={"feature": q.tolist(), "topk": 5,
                                                                         "camids": f})
                                             for q, f in zip(queries, filters)))
        await busy
        return answers

    before, start = service.health(), time.monotonic()
    answers = asyncio.run(run())
    elapsed, after = time.monotonic() - start, service.health()
    for query, camids, answer in zip(queries, filters, answers):
        assert answer.status_code == 200, answer.text
        assert [h["id"] for h in answer.json()["results"]] == brute_force(ref, query, 5, camids)[0]
    assert calls[0] == 1 and sorted(calls[1:]) == [2, 3, 3, 24], calls  # cams [0]: 3, [1]: 3, [2]: 2, all: 24
    assert (after.searches - before.searches, after.search_batches - before.search_batches) == (33, 2)
    assert 0.01 < after.search_seconds - before.search_seconds <= elapsed  # the held search (>= one 10 ms sleep) counts


def test_micro_batcher_serves_what_waits_in_one_call() -> None:
    gate, calls = threading.Event(), []

    def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        gate.wait(10)
        return [2 * x for x in items]

    batcher = MicroBatcher(double, max_batch=4, name="test")
    futures = [batcher.submit(0)]
    while not calls:  # the first item is taken alone, at once
        time.sleep(0.001)
    futures += [batcher.submit(i) for i in range(1, 7)]
    assert batcher.waiting == 6
    gate.set()
    assert [f.result(10) for f in futures] == [0, 2, 4, 6, 8, 10, 12]
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]  # at most max_batch per call, in order
    assert (batcher.calls, batcher.items) == (3, 7)

    # announced items: a call waits for them (here up to 2 s: 100 x the previous call's 20 ms, within max_wait)
    announced = MicroBatcher(lambda items: time.sleep(0.02 * (items == [0])) or calls.append(list(items)) or items,
                             max_batch=8, name="announced", wait_fraction=100, max_wait=5)
    announced.submit(0).result(10)
    calls.clear()
    with announced.ticket() as ticket:
        first = announced.submit(1)  # a call starts with 1 while 2 is on its way...
        time.sleep(0.001)
        second = announced.submit(2, ticket)
    assert (first.result(10), second.result(10)) == (1, 2) and calls == [[1, 2]]  # ...and serves both
    with announced.ticket():
        pass  # announced, never submitted: no call is held by it afterwards
    assert announced.submit(3).result(10) == 3 and calls[-1] == [3]
    announced.close()

    # callers answered by a call come back: the next call waits for as many as the last one saw (else two
    # groups of clients take turns, each call serving half of them)
    held, seen = threading.Event(), []
    turns = MicroBatcher(lambda items: (held.wait(10) and seen.append(list(items))) or items, max_batch=8,
                         name="turns", wait_fraction=100, max_wait=5)
    group_a = turns.submit("a")
    while turns.waiting:  # "a" is being served...
        time.sleep(0.001)
    group_b = [turns.submit(x) for x in ("b1", "b2")]  # ...while group b waits
    time.sleep(0.03)  # the call of "a" lasts 30 ms: the next one may wait up to 100 x that (capped at 5 s)
    held.set()
    assert group_a.result(10) == "a"
    time.sleep(0.05)
    a_again = turns.submit("a2")  # "a" comes back after its answer, while b1, b2 wait for it
    assert [f.result(10) for f in (*group_b, a_again)] == ["b1", "b2", "a2"]
    assert seen == [["a"], ["b1", "b2", "a2"]]
    turns.close()

    failing = MicroBatcher(lambda items: [1 / x for x in items], max_batch=8, name="fail")
    with pytest.raises(ZeroDivisionError):
        failing.submit(0).result(10)
    assert failing.submit(4).result(10) == 0.25  # the worker survives a failed batch
    batcher.close()
    failing.close()


def test_micro_batchers_can_share_one_thread_for_their_calls() -> None:
    where: list[str] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shared") as shared:
        batchers = [MicroBatcher(lambda items: where.append(threading.current_thread().name) or items, max_batch=4,
                                 name=f"b{i}", executor=shared) for i in range(2)]
        assert [b.submit(i).result(10) for i, b in enumerate(batchers)] == [0, 1]
        for b in batchers:
            b.close()
    assert where == ["shared_0", "shared_0"]


def test_all_torch_work_of_the_service_runs_on_its_one_torch_thread(gallery: Gallery,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading, the first pass, the network, preprocessing, embedding and searching: never on the caller's
    thread or the batchers' (libgomp gives each thread that starts parallel work an OpenMP team of its own;
    with more teams than CPUs each parallel op waits for a wake-up: see ``torch_thread``)."""
    seen: list[tuple[str, str]] = []

    def spy(owner: type, name: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            seen.append((name, threading.current_thread().name))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)

    for owner, name in ((GalleryIndex, "load"), (GalleryIndex, "first_pass"), (GalleryIndex, "search"),
                        (FeatureExtractor, "__init__"), (FeatureExtractor, "preprocess")):
        spy(owner, name)
    service = SearchService.open(gallery.index, queries=gallery.queries, device="cpu", backend="eager")
    try:
        feature = asyncio.run(service.embed(Image.open(sorted(gallery.queries.glob("*.jpg"))[0]).convert("RGB")))
        asyncio.run(service.search(feature, 5))
    finally:
        service.close()
    assert {name for name, _ in seen} == {"load", "first_pass", "search", "__init__", "preprocess"}
    assert {thread for _, thread in seen} == {"cgpn-torch_0"}, seen


# --- what a person sees (HTML) --------------------------------------------------------------------------


TILE = re.compile(r'class="tile (\w+)[^"]*"[^>]*data-id="(\d+)" data-rank="(\d+)"')


def _tiles(html: str) -> list[tuple[str, int, int]]:
    results = html[html.index('id="results"'):]
    return [(frame, int(i), int(rank)) for frame, i, rank in TILE.findall(results)]


def test_results_page_filters_pages_and_frames(client: TestClient, ref: dict) -> None:
    row = 5
    query, pid, camid = ref["features"][row], int(ref["pids"][row]), int(ref["camids"][row])
    page1 = client.get(f"/search?gallery={row}")
    page2 = client.get(f"/search?gallery={row}&page=2")
    assert page1.status_code == page2.status_code == 200
    tiles = _tiles(page1.text) + _tiles(page2.text)
    assert [i for _, i, _ in tiles] == brute_force(ref, query, 2 * PER_PAGE)[0]
    assert [r for _, _, r in tiles] == list(range(1, 2 * PER_PAGE + 1))
    assert tiles[0][1] == row  # a gallery image is its own nearest
    assert "same identity" in page1.text  # the legend of the frames
    # green (match) exactly where the identity is the query's, red elsewhere (cgpn show's frames)
    assert all((frame == "match") == (int(ref["pids"][i]) == pid) for frame, i, _ in tiles)
    assert {frame for frame, _, _ in tiles} <= {"match", "other"}

    hidden = client.get(f"/search?gallery={row}&hide_same_camera=1")
    others = [c for c in range(3) if c != camid]
    assert [i for _, i, _ in _tiles(hidden.text)] == brute_force(ref, query, PER_PAGE, others)[0]
    cam = client.get(f"/search?gallery={row}&cam={others[0]}")
    assert [i for _, i, _ in _tiles(cam.text)] == brute_force(ref, query, PER_PAGE, [others[0]])[0]

    rows, scores = brute_force(ref, query, 4)
    distances = np.sqrt(np.maximum(0, 2 - 2 * scores))
    threshold = (distances[2] + distances[3]) / 2  # between the 3rd and the 4th: 3 matches
    if distances[3] - distances[2] > 2e-4:  # not a near-tie the page's rounding could flip
        near = client.get(f"/search?gallery={row}&threshold={threshold:.6f}")
        assert [i for _, i, _ in _tiles(near.text)] == rows[:3]
        assert "No match in the gallery" not in near.text
    far = client.get(f"/search?gallery={row}&hide_same_camera=1&threshold=0")  # itself hidden: all beyond 0
    assert "No match in the gallery" in far.text and not _tiles(far.text)
    alone = client.get(f"/search?gallery={row}&cam={camid}&hide_same_camera=1")
    assert "no camera is left" in alone.text and not _tiles(alone.text)


def test_upload_on_the_page_redirects_to_its_results(client: TestClient, gallery: Gallery, ref: dict,
                                                     capsys: pytest.CaptureFixture) -> None:
    query = sorted(gallery.queries.glob("*.jpg"))[2]
    posted = client.post("/search", files={"image": _jpeg(query)}, data={"threshold": ""}, follow_redirects=False)
    assert posted.status_code == 303 and re.fullmatch(r"/search\?upload=[0-9a-f]{16}", posted.headers["location"])
    page = client.get(posted.headers["location"])
    cli_hits = cli_search(capsys, gallery, query, PER_PAGE)
    assert [str(ref["paths"][i]) for _, i, _ in _tiles(page.text)] == [h["path"] for h in cli_hits]
    assert {frame for frame, _, _ in _tiles(page.text)} == {"plain"}  # an upload's identity is unknown
    assert "same identity" not in page.text and "identity unknown" in page.text
    thumb = client.get(re.search(r'src="(/api/uploads/[0-9a-f]{16}/thumb)"', page.text).group(1))
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"


def test_gallery_and_query_lists(client: TestClient, gallery: Gallery, ref: dict) -> None:
    names = sorted(p.name for p in gallery.images.glob("*.jpg"))
    health = client.get("/api/health").json()
    assert health["gallery_size"] == len(names) and health["dim"] == 3072  # 12 x 256 (Section 4.2)
    assert health["cameras"] == sorted({int(n.split("_c")[1][0]) - 1 for n in names})
    assert health["queries"] == len(list(gallery.queries.glob("*.jpg"))) and health["index_kind"] == "flat"
    assert health["first_pass"] is None  # auto: a gallery this small is searched in one fp32 pass
    assert health["first_pass_by_batch"] == {"1": None, "2": None, "4": None, "8": None, "16": None, "32": None,
                                             "64": None}  # every batch the searcher forms (max_batch 64)
    for i in (0, len(names) - 1):
        item = client.get(f"/api/gallery/{i}").json()
        assert item == {"id": i, "name": names[i], "pid": int(names[i][:4]), "camid": int(names[i][6]) - 1}
        assert client.get(f"/api/gallery/{i}/image").content == (gallery.images / names[i]).read_bytes()
        thumb = Image.open(io.BytesIO(client.get(f"/api/gallery/{i}/thumb").content))
        assert thumb.format == "JPEG" and thumb.width <= 128 and thumb.height <= 256
    home = client.get("/")
    assert home.text.count("/api/queries/") == health["queries"]  # every query listed (one page of 48)
    listing = client.get("/gallery")
    assert [int(i) for i in re.findall(r'data-id="(\d+)"', listing.text)] == list(range(len(names)))


def test_pages_carry_no_javascript(client: TestClient, gallery: Gallery) -> None:
    """README: the search page works without JavaScript: no script element, no inline handler, no .js file."""
    query = sorted(gallery.queries.glob("*.jpg"))[0]
    upload = client.post("/search", files={"image": _jpeg(query)}, data={"threshold": ""})
    pages = [client.get(path) for path in ("/", "/gallery", "/search?gallery=0", "/search?query=0")] + [upload]
    for page in pages:
        assert page.status_code == 200, page.url
        assert not re.search(r"<script|\son[a-z]+\s*=|javascript:", page.text, re.IGNORECASE), page.url
    static = Path(cgpn.serve.__file__).parent / "static"
    assert static.is_dir() and not list(static.rglob("*.js"))


def test_an_image_is_judged_by_its_bytes_not_its_name(client: TestClient, gallery: Gallery) -> None:
    """README: uploads are judged by decoding: a JPEG sent as 'notes.txt' of type application/octet-stream,
    and the same picture as PNG bytes named '.jpg', rank as the JPEG does."""
    query = sorted(gallery.queries.glob("*.jpg"))[1]
    as_png = io.BytesIO()
    Image.open(query).save(as_png, "PNG")
    answers = [client.post("/api/search", files={"image": upload}, data={"topk": "5"})
               for upload in (_jpeg(query), ("notes.txt", query.read_bytes(), "application/octet-stream"),
                              ("photo.jpg", as_png.getvalue(), "image/jpeg"))]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    ids = [[h["id"] for h in a.json()["results"]] for a in answers]
    assert ids[1] == ids[0] and ids[2] == ids[0]  # the PNG holds the pixels the JPEG decodes to


def test_the_upload_limits_default_to_the_readmes_figures() -> None:
    """README: uploads are limited to 10 MB (--max-upload-mb) and 25 million pixels (--max-pixels) by default."""
    from cgpn.cli import build_parser

    args = build_parser().parse_args(["serve", "--index", "gallery.faiss"])
    assert (args.max_upload_mb, args.max_pixels) == (10, 25_000_000)
    assert (ServeSettings().max_upload_mb, ServeSettings().max_pixels) == (10, 25_000_000)


# --- an unlucky user --------------------------------------------------------------------------------------


def _truncated_jpeg(gallery: Gallery) -> bytes:
    data = sorted(gallery.queries.glob("*.jpg"))[0].read_bytes()
    return data[: len(data) // 2]


def _b64(values: list[float] | np.ndarray, dtype: str = "<f4") -> str:
    """A feature as feature_base64 sends it: base64 of its little-endian bytes (float32 unless told)."""
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


BAD_REQUESTS = {
    "not an image": (lambda g: {"files": {"image": ("person.jpg", b"GIF? no: plain text", "image/jpeg")}},
                     415, "the upload is not an image"),
    "truncated JPEG": (lambda g: {"files": {"image": ("cut.jpg", _truncated_jpeg(g), "image/jpeg")}},
                       400, "not a complete JPEG image"),
    "decompression bomb": (lambda g: {"files": {"image": ("bomb.png", _png("1", (20000, 20000)), "image/png")}},
                           413, "too large"),
    "huge dimensions": (lambda g: {"files": {"image": ("big.png", _png("1", (6000, 5000)), "image/png")}},
                        413, "6000 x 5000 = 30,000,000 pixels, over the limit of 25,000,000"),
    "16-bit image": (lambda g: {"files": {"image": ("deep.png", _png("I;16", (32, 64)), "image/png")}},
                     415, "16-bit"),
    "empty upload": (lambda g: {"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 400, "the upload is empty"),
    "no image field": (lambda g: {"data": {"topk": "3"}, "files": {"other": ("a.txt", b"x", "text/plain")}},
                       422, "no image in the upload"),
    "over the byte limit": (lambda g: {"files": {"image": ("big.jpg", b"\xff" * 400_000, "image/jpeg")}},
                            413, "over the limit of 262,144 bytes"),
    "chunked, over the byte limit": (lambda g: {"content": (b"x" * 65536 for _ in range(8)),
                                                "headers": {"content-type": "multipart/form-data; boundary=b"}},
                                     413, "over the limit of 262,144 bytes"),
    "wrong content type": (lambda g: {"content": b"hello", "headers": {"content-type": "text/plain"}},
                           415, "send multipart/form-data"),
    "wrong feature length": (lambda g: {"json": {"feature": [0.5] * 10}}, 422, "the feature has 10 values; this index "
                             "holds 3072-d features"),
    "NaN in the feature": (lambda g: {"content": '{"feature": [NaN' + ", 1.0" * 3071 + "]}",
                                      "headers": {"content-type": "application/json"}}, 422, "NaN or infinite"),
    "zero feature": (lambda g: {"json": {"feature": [0.0] * 3072}}, 422, "all zeros"),
    "both feature forms": (lambda g: {"json": {"feature": [0.5] * 3072, "feature_base64": _b64([0.5] * 3072)}}, 422,
                           "not both"),
    "no feature": (lambda g: {"json": {"topk": 3}}, 422, "not neither"),
    "feature_base64 not base64": (lambda g: {"json": {"feature_base64": "AAAA!AAA"}}, 422, "feature_base64 is not "
                                  "base64"),
    "feature_base64 not ASCII": (lambda g: {"json": {"feature_base64": "\u00ff\u00ff\u00ff\u00ff"}}, 422,
                                 "feature_base64 is not base64"),
    "feature_base64 of float64": (lambda g: {"json": {"feature_base64": _b64([0.5] * 3072, "<f8")}}, 422,
                                  "feature_base64 holds 24576 bytes; this index holds 3072-d features: 12288 bytes"),
    "NaN in feature_base64": (lambda g: {"json": {"feature_base64": _b64([np.nan] + [1.0] * 3071)}}, 422,
                              "NaN or infinite"),
    "topk 0": (lambda g: {"json": {"feature": [0.5] * 3072, "topk": 0}}, 422, "topk: Input should be greater than "
               "or equal to 1 (got 0)"),
    "topk 0 with an image": (lambda g: {"files": {"image": _jpeg(sorted(g.queries.glob("*.jpg"))[0])},
                                        "data": {"topk": "0"}}, 422, "topk"),
    "topk not a number": (lambda g: {"files": {"image": _jpeg(sorted(g.queries.glob("*.jpg"))[0])},
                                     "data": {"topk": "ten"}}, 422, "topk: Input should be a valid integer"),
    "topk too large": (lambda g: {"json": {"feature": [0.5] * 3072, "topk": 100000}}, 422,
                       "topk must be between 1 and 1000, got 100000"),
    "unknown camera": (lambda g: {"json": {"feature": [0.5] * 3072, "camids": [7]}}, 422,
                       "unknown camera 7: this gallery has camids 0, 1, 2"),
    "empty camera filter": (lambda g: {"json": {"feature": [0.5] * 3072, "camids": []}}, 422,
                            "the camera filter is empty"),
    "misspelt field": (lambda g: {"json": {"feature": [0.5] * 3072, "topK": 3}}, 422, "topK: Extra inputs are not "
                       "permitted"),
    "not JSON": (lambda g: {"content": b"{feature: ", "headers": {"content-type": "application/json"}}, 422,
                 "Invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_search_requests_get_one_line_and_the_server_keeps_serving(client: TestClient, gallery: Gallery,
                                                                       case: str) -> None:
    make, status, text = BAD_REQUESTS[case]
    answer = client.post("/api/search", **make(gallery))
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert list(body) == ["detail"] and text in body["detail"], body
    assert "\n" not in body["detail"] and "Traceback" not in body["detail"]
    assert answer.headers["x-content-type-options"] == "nosniff"  # refusals of BodyLimit included
    assert client.post("/api/search", json={"feature": [0.5] * 3072, "topk": 1}).status_code == 200


@pytest.mark.parametrize(("path", "status", "text"), [
    ("/api/gallery/24/image", 404, "gallery id 24 does not exist: ids run from 0 to 23"),
    ("/api/gallery/-1/thumb", 404, "gallery id -1 does not exist"),
    ("/api/gallery/abc/image", 422, "id: Input should be a valid integer"),
    ("/api/gallery/..%2F..%2F..%2Fetc%2Fpasswd/image", 404, "images are fetched by id"),
    ("/api/gallery/0%2F..%2F..%2Fetc%2Fpasswd", 404, "images are fetched by id"),
    ("/api/gallery/%2Fetc%2Fpasswd/thumb", 404, "images are fetched by id"),
    ("/api/queries/12/image", 404, "query number 12 does not exist: ids run from 0 to 11"),
    ("/api/uploads/0123456789abcdef/thumb", 404, "no uploaded query '0123456789abcdef'"),
    ("/api/uploads/..%2F..%2Fetc%2Fpasswd/thumb", 404, "images are fetched by id"),
    ("/api/nothing", 404, "nothing at /api/nothing"),
])
def test_bad_ids_get_one_line(client: TestClient, path: str, status: int, text: str) -> None:
    answer = client.get(path)
    assert answer.status_code == status, answer.text
    assert text in answer.json()["detail"] and "root:" not in answer.text
    thumb = client.get("/api/gallery/0/thumb")
    assert thumb.status_code == 200 and thumb.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "text"), [
    ("post", "/search", {"files": {"image": ("a.jpg", b"not an image at all", "image/jpeg")}}, 415,
     "the upload is not an image"),
    ("get", "/search?gallery=3&threshold=far", {}, 422, "threshold must be a distance between 0 and 2"),
    ("get", "/search?gallery=3&cam=x", {}, 422, "cam must be camera numbers"),
    ("get", "/search?gallery=3&cam=9", {}, 422, "unknown camera 9"),
    ("get", "/search?gallery=99", {}, 404, "gallery id 99 does not exist"),
    ("get", "/search?gallery=3&query=1", {}, 422, "exactly one"),
    ("get", "/search?query=first", {}, 422, "query: Input should be a valid integer"),
    ("get", "/search?upload=ffffffffffffffff", {}, 404, "upload the image again"),
    ("get", "/search?upload=../../etc/passwd", {}, 422, "upload: String should match pattern"),
    ("get", "/search?gallery=3&page=0", {}, 404, "page 0 does not exist"),
    ("get", "/gallery?page=9", {}, 404, "page 9 does not exist: the list has 1 page"),
])
def test_page_errors_are_pages_with_one_line(client: TestClient, method: str, path: str, kwargs: dict,
                                             status: int, text: str) -> None:
    answer = getattr(client, method)(path, **kwargs)
    assert answer.status_code == status and answer.headers["content-type"].startswith("text/html")
    alert = re.search(r'role="alert">([^<]*)</p>', answer.text).group(1)
    assert text in alert.replace("&#39;", "'"), alert
    assert 'action="/search"' in answer.text  # the upload form is there to try again


def test_index_and_features_are_opened_read_only(gallery: Gallery) -> None:
    files = [gallery.index, gallery.features, *sorted(gallery.images.iterdir())]

    def state() -> list[tuple[str, int, str]]:
        return [(p.name, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]

    before, listing = state(), sorted(gallery.index.parent.iterdir())
    service = SearchService.open(gallery.index, settings=ServeSettings(), device="cpu", backend="eager")
    with TestClient(create_app(service)) as c:
        maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()
                if line.endswith(str(gallery.index))]
        assert maps and all("w" not in m[1] for m in maps), maps  # the vectors are mapped without write access
        assert c.post("/api/search", files={"image": _jpeg(sorted(gallery.queries.glob("*.jpg"))[0])}).status_code == 200
        assert c.get("/search?gallery=1").status_code == 200 and c.get("/api/gallery/1/image").status_code == 200
    assert state() == before
    assert sorted(gallery.index.parent.iterdir()) == listing  # nothing written beside them either


# --- the command line --------------------------------------------------------------------------------------


def test_cgpn_serve_answers_on_a_free_loopback_port_and_stops_on_ctrl_c(gallery: Gallery) -> None:
    with serve_process(gallery) as url:
        health = httpx.get(f"{url}/api/health", timeout=30).json()
        assert health["gallery_size"] == len(list(gallery.images.glob("*.jpg")))
        assert httpx.get(f"{url}/api/gallery/abc/image", timeout=30).status_code == 422
        openapi = httpx.get(f"{url}/openapi.json", timeout=30).json()
        assert {"/api/search", "/api/health", "/api/gallery/{id}/image", "/api/gallery/{id}/thumb"} <= set(openapi["paths"])
        body = openapi["paths"]["/api/search"]["post"]["requestBody"]["content"]
        assert set(body) == {"application/json", "multipart/form-data"}


def test_cgpn_serve_on_an_ipv6_host_prints_a_url_that_answers(gallery: Gallery) -> None:
    """README: --host picks the address; an IPv6 one is printed in brackets (http://[::1]:PORT), as URLs need."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with serve_process(gallery, "--host", "::1") as url:
        assert url.startswith("http://[::1]:")
        with httpx.Client(trust_env=False, timeout=30) as direct:  # no proxy from the environment for [::1]
            health = direct.get(f"{url}/api/health").json()
        assert health["gallery_size"] == len(list(gallery.images.glob("*.jpg")))


def test_serve_hands_the_gil_over_often_and_freezes_what_the_start_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """While uvicorn runs, a thread holding the GIL gives it up after SWITCH_INTERVAL (0.2 ms, not Python's 5 ms:
    the event loop waits less for the search thread) and the objects made before are out of the garbage
    collector's scans; both are undone after the server stops."""
    import gc
    import sys

    import uvicorn
    from fastapi import FastAPI

    from cgpn.serve import app as app_module

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: seen.append((sys.getswitchinterval(),
                                                                                  gc.get_freeze_count())))
    before = sys.getswitchinterval()
    with socket.socket() as sock:
        app_module.serve(FastAPI(), sock)
    assert seen[0][0] == pytest.approx(0.0002) and seen[0][1] > 10_000  # the test session's objects, at least
    assert sys.getswitchinterval() == before and gc.get_freeze_count() == 0


def test_cgpn_serve_checks_its_settings_before_loading(gallery: Gallery, capsys: pytest.CaptureFixture,
                                                       tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = error_line(cli(capsys, "serve", "--index", str(tmp_path / "missing.faiss"), "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "pick another --port" in line
    line = error_line(cli(capsys, "serve", "--index", str(gallery.index), "--port", "70000"))
    assert "--port must be between 0 (any free port) and 65535, got 70000" in line
    line = error_line(cli(capsys, "serve", "--index", str(gallery.index), "--max-pixels", "0", "--port", "0"))
    assert "max-pixels must be at least 1, got 0" in line
    line = error_line(cli(capsys, "serve", "--index", str(tmp_path / "missing.faiss"), "--port", "0"))
    assert "missing.faiss" in line and "does not exist" in line
    line = error_line(cli(capsys, "serve", "--index", str(gallery.index), "--queries", str(tmp_path / "no"),
                          "--port", "0"))
    assert "image folder" in line and "does not exist" in line
    assert len(GalleryIndex.load(gallery.index)) == 24  # none of the refused starts touched the index


def test_an_onnx_file_embeds_the_queries_as_it_does_for_cgpn_search(gallery: Gallery, ref: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """``--checkpoint model.onnx`` (written by cgpn export) runs through the runtime's ONNX Runtime path."""
    onnx = tmp_path / "tiny.onnx"
    assert cli(capsys, "export", "--checkpoint", str(gallery.checkpoint), "--onnx", str(onnx)).returncode == 0
    query = sorted(gallery.queries.glob("*.jpg"))[4]
    service = SearchService.open(gallery.index, checkpoint=onnx, device="cpu")
    with TestClient(create_app(service)) as c:
        hits = c.post("/api/search", files={"image": _jpeg(query)}, data={"topk": "8"}).json()["results"]
        assert c.get("/api/health").json()["model"]["backend"] == "onnx"
    run = cli(capsys, "search", "--index", str(gallery.index), "--query", str(query), "--topk", "8", "--json",
              "--checkpoint", str(onnx))
    assert run.returncode == 0, run.stderr
    assert [str(ref["paths"][h["id"]]) for h in hits] == [h["path"] for h in json.loads(run.stdout)[0]["results"]]
