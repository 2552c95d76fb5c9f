"""The search page a person uses: server-rendered HTML that works without JavaScript.

``/`` offers the ``--queries`` images and an upload form; ``/gallery`` lists the gallery; ``/search``
shows a query's nearest gallery images in rank order (framed green / red when the query's identity is
known, as ``cgpn show`` frames them), with a camera filter, a "hide same camera" switch, a distance
threshold beyond which the page says there is no match, and pages of results. Every result links to the
search from that image. An upload is posted to ``/search``, embedded once, kept under a token and
redirected to ``/search?upload=TOKEN`` (so reloading and paging need no new upload).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import RedirectResponse, Response

from cgpn.errors import RequestError
from cgpn.serve.api import get_service, read_upload
from cgpn.serve.models import Hit
from cgpn.serve.render import render
from cgpn.serve.service import SearchService

__all__ = ["LIST_PAGE", "router"]

router = APIRouter(include_in_schema=False)
Service = Annotated[SearchService, Depends(get_service)]
LIST_PAGE = 48  # thumbnails per page of the query and gallery lists


@dataclass(frozen=True)
class Source:
    """Where a page's query comes from: ``query`` (n-th --queries image), ``gallery`` (an id) or ``upload``."""

    param: str
    key: str
    name: str
    thumb: str
    pid: int | None = None
    camid: int | None = None


@dataclass
class Filters:
    """The page's settings of a search: cameras kept (none: all), hide the query's camera, distance threshold."""

    cams: list[int] = field(default_factory=list)
    hide_same_camera: bool = False
    threshold: float | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """As query-string pairs (what the filter form sends)."""
        out = [("cam", str(c)) for c in self.cams]
        if self.hide_same_camera:
            out.append(("hide_same_camera", "1"))
        if self.threshold is not None:
            out.append(("threshold", f"{self.threshold:g}"))
        return out


def parse_filters(cams: list[str], hide_same_camera: str, threshold: str) -> Filters:
    """The filters from the raw values of the form (GET query string or POST form alike)."""
    try:
        cam_ids = sorted({int(c) for c in cams})
    except ValueError:
        raise RequestError(f"cam must be camera numbers (camids from 0), got {', '.join(cams)[:60]!r}") from None
    value = None
    if threshold.strip():
        try:
            value = float(threshold)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 2.0:
            raise RequestError(f"threshold must be a distance between 0 and 2 (features are L2-normalised), "
                               f"got {threshold[:40]!r}")
    return Filters(cam_ids, hide_same_camera.lower() in ("1", "on", "true"), value)


def _pages(count: int, number: int, per_page: int) -> tuple[range, int]:
    """(the item numbers on page ``number``, the number of pages), or a RequestError for a page beyond them."""
    pages = max(1, -(-count // per_page))
    if not 1 <= number <= pages:
        raise RequestError(f"page {number} does not exist: the list has {pages} page{'s' * (pages > 1)}", 404)
    start = (number - 1) * per_page
    return range(start, min(count, start + per_page)), pages


def _list_page(request: Request, service: SearchService, kind: str, number: int, template: str, title: str) -> Response:
    numbers, pages = _pages(service.count(kind), number, LIST_PAGE)
    return render(request, template, title=title, health=service.health(), kind=kind, page=number, pages=pages,
                items=[service.item(kind, n) for n in numbers])


@router.get("/")
async def home(request: Request, service: Service, number: Annotated[int, Query(alias="page")] = 1) -> Response:
    return _list_page(request, service, "query", number, "home.html", "Gallery search")


@router.get("/gallery")
async def gallery(request: Request, service: Service, number: Annotated[int, Query(alias="page")] = 1) -> Response:
    return _list_page(request, service, "gallery", number, "gallery.html", "Gallery")


def _source(request: Request, service: SearchService, query: int | None, gallery: int | None,
            upload: str | None) -> Source:
    given = [(k, v) for k, v in (("query", query), ("gallery", gallery), ("upload", upload)) if v is not None]
    if len(given) != 1:
        raise RequestError("say which query to search with: ?query=N (an image of --queries), ?gallery=ID (a gallery "
                           "image) or ?upload=TOKEN (an upload), exactly one", 422)
    root = request.scope.get("root_path", "")
    if upload is not None:
        return Source("upload", upload, service.upload(upload).name, f"{root}/api/uploads/{upload}/thumb")
    kind, number = ("query", query) if query is not None else ("gallery", gallery)
    item = service.item(kind, number)
    prefix = "gallery" if kind == "gallery" else "queries"
    return Source(kind, str(number), item.name, f"{root}/api/{prefix}/{number}/thumb", item.pid, item.camid)


def _frame(hit: Hit, source: Source) -> str:
    if source.pid is None or hit.pid is None:
        return "plain"
    return "match" if hit.pid == source.pid else "other"


@router.get("/search")
async def search_page(request: Request, service: Service, query: int | None = None, gallery: int | None = None,
                      upload: Annotated[str | None, Query(pattern="^[0-9a-f]{16}$")] = None,
                      cam: Annotated[list[str] | None, Query()] = None, hide_same_camera: str = "",
                      threshold: str = "", number: Annotated[int, Query(alias="page")] = 1) -> Response:
    source = _source(request, service, query, gallery, upload)
    filters = parse_filters(cam or [], hide_same_camera, threshold)
    per_page, max_topk = service.settings.per_page, service.settings.max_topk
    if number < 1 or (number - 1) * per_page >= max_topk:
        raise RequestError(f"page {number} does not exist: results come {per_page} a page, at most {max_topk} in "
                           f"all", 404)
    if source.param == "upload":
        feature = service.upload(source.key).feature
    else:
        feature = await service.file_feature(source.param, int(source.key))
    cams: list[int] | None = filters.cams or None
    note = ""
    if filters.hide_same_camera:
        if source.camid is None:
            note = "the query's camera is unknown, so 'hide same camera' hides nothing"
        else:
            cams = sorted(set(cams or service.cameras) - {source.camid})
            if not cams:
                note = "no camera is left once the query's own camera is hidden: choose other cameras"
    hits = await service.search(feature, min(max_topk, number * per_page + 1), cams) if cams != [] else []
    matches = hits if filters.threshold is None else [h for h in hits if h.distance <= filters.threshold]
    start = (number - 1) * per_page
    root = request.scope.get("root_path", "")

    def url(**change: object) -> str:
        return f"{root}/search?{urlencode([(source.param, source.key), *filters.pairs(), *change.items()])}"

    tiles = [(hit, _frame(hit, source), source.param == "gallery" and hit.id == int(source.key),
              f"{root}/search?{urlencode([('gallery', hit.id), *filters.pairs()])}")
             for hit in matches[start:start + per_page]]
    return render(request, "search.html", title=f"Search: {source.name}", health=service.health(),
                  cameras=service.cameras, source=source, filters=filters, tiles=tiles, note=note,
                  no_match=filters.threshold is not None and bool(hits) and not matches,
                  nearest=hits[0].distance if hits else None, page=number, first_rank=start + 1,
                  identity_known=source.pid is not None, prev_url=url(page=number - 1) if number > 1 else "",
                  next_url=url(page=number + 1) if len(matches) > start + per_page else "")


@router.post("/search")
async def upload_search(request: Request, service: Service) -> Response:
    with service.embed_ticket() as ticket:
        image, name, fields = await read_upload(request, service)
        filters = parse_filters(fields.get("cam", []), (fields.get("hide_same_camera") or [""])[0],
                                (fields.get("threshold") or [""])[0])
        feature = await service.embed(image, ticket)
    token = service.remember(feature, image, name)
    query = urlencode([("upload", token), *filters.pairs()])
    return RedirectResponse(f"{request.scope.get('root_path', '')}/search?{query}", status_code=303)
