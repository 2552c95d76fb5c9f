"""The JSON API: search by image or by feature, gallery and query images by id, health.

Images are served by their number in the index (or in the ``--queries`` folder) only: no route takes a
path. Every refused request answers ``{"detail": "one line"}`` with a 4xx status (see ``app.py``).
"""

from typing import Annotated  # no `from __future__ import annotations`: FastAPI reads the routes' annotations

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse, Response

from cgpn.errors import RequestError
from cgpn.serve.models import ErrorResponse, FeatureQuery, GalleryItem, Health, ImageQuery, SearchResponse
from cgpn.serve.service import SearchService
from cgpn.serve.uploads import decode_upload

__all__ = ["get_service", "read_upload", "router", "validation_message"]

router = APIRouter(prefix="/api", tags=["api"], responses={
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "a truncated or empty upload"), (404, "an id that does not exist"),
        (413, "an upload over the byte or pixel limit"), (415, "an upload that is not an image"),
        (422, "a wrong value: feature length, topk, camera"))})

THUMB_HEADERS = {"Cache-Control": "public, max-age=3600"}
_MULTIPART_SCHEMA = {"type": "object", "required": ["image"], "properties": {
    "image": {"type": "string", "format": "binary", "description": "the query image (JPEG, PNG, BMP or WebP)"},
    "topk": {"type": "integer", "default": 10, "minimum": 1},
    "camids": {"type": "array", "items": {"type": "integer"}, "description": "cameras to keep (repeat the field)"}}}


async def get_service(request: Request) -> SearchService:
    """The app's ``SearchService`` (a FastAPI dependency; async, so FastAPI calls it on the event loop rather
    than in a worker thread)."""
    return request.app.state.service


Service = Annotated[SearchService, Depends(get_service)]
ItemId = Annotated[int, Path(description="row of the index, 0 to gallery_size - 1")]
QueryNumber = Annotated[int, Path(description="position in the --queries folder (sorted), from 0")]


def validation_message(err: ValidationError | list[dict]) -> str:
    """Pydantic's errors as one line: ``topk: Input should be greater than or equal to 1 (got 0)``."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    parts = []
    for e in errors[:3]:
        loc = tuple(e.get("loc", ()))
        loc = ".".join(str(x) for x in (loc[1:] if loc[:1] in (("body",), ("query",), ("path",)) else loc)) or "request"
        got = f" (got {repr(e['input'])[:40]})" if e.get("input") is not None and e.get("type") != "missing" else ""
        parts.append(f"{loc}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


async def read_upload(request: Request, service: SearchService):
    """(decoded RGB image, sent file name, the other form fields) of a multipart upload in field ``image``."""
    form = await request.form(max_files=1, max_fields=32)
    file = form.get("image")
    if not isinstance(file, UploadFile):
        raise RequestError("no image in the upload: send the file in the multipart form field 'image'", 422)
    data = await file.read()
    image = await run_in_threadpool(decode_upload, data, service.settings.max_pixels)
    fields = {k: form.getlist(k) for k in form if k != "image"}
    return image, file.filename or "upload", fields


@router.get("/health", response_model=Health, summary="What the server serves")
async def health(service: Service) -> Health:
    return service.health()


@router.post("/search", response_model=SearchResponse, summary="The nearest gallery images of a query",
             description="Send either an image (`multipart/form-data`, file field `image`, optional `topk` and "
             "repeated `camids`) or a feature (`application/json`: `feature` as numbers or `feature_base64` as base64 "
             "of its little-endian float32 bytes, `topk`, `camids`). Results are "
             "ranked as `cgpn search --json` ranks them for the same image.",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": FeatureQuery.model_json_schema()},
                 "multipart/form-data": {"schema": _MULTIPART_SCHEMA}}}})
async def search(request: Request) -> Response:
    service: SearchService = request.app.state.service  # not a dependency: FastAPI's solving them took a tenth of
    # the event loop's time per feature query (py-spy, 32 clients)
    with service.search_ticket() as ticket:  # concurrent searches may wait a little for this one
        query, feature = await _query(request, service)
        hits = await service.search(feature, query.topk, query.camids, ticket)
    # serialised here: FastAPI would validate the model again against response_model (which documents it)
    return Response(SearchResponse(topk=query.topk, camids=query.camids, results=hits).model_dump_json(),
                    media_type="application/json")


async def _query(request: Request, service: SearchService) -> tuple[ImageQuery | FeatureQuery, np.ndarray]:
    """The search settings and the query feature of a request: an uploaded image (embedded) or a feature."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        with service.embed_ticket() as ticket:
            image, _, fields = await read_upload(request, service)
            try:
                query = ImageQuery.model_validate({k: v if k == "camids" else v[0] for k, v in fields.items()})
            except ValidationError as err:
                raise RequestError(validation_message(err)) from None
            service.check_search(query.topk, query.camids)  # before the image is embedded
            return query, await service.embed(image, ticket)
    if content_type.startswith("application/json"):
        try:
            query = FeatureQuery.model_validate_json(await request.body())
        except ValidationError as err:
            raise RequestError(validation_message(err)) from None
        return query, service.query_feature(query)
    raise RequestError(f"content type '{content_type[:60]}' is not accepted: send multipart/form-data with an image "
                       f"in field 'image', or application/json with a 'feature' or 'feature_base64'", 415)


def _image_routes(kind: str, prefix: str, number: type) -> None:
    """``{prefix}/{id}`` (its ids), ``/image`` (the file) and ``/thumb`` (a small JPEG) of a list of images."""
    what = "gallery image" if kind == "gallery" else "query image (--queries)"

    @router.get(f"{prefix}/{{id}}", response_model=GalleryItem, summary=f"Id, name, identity, camera of a {what}")
    async def item(id: number, service: Service) -> GalleryItem:
        return service.item(kind, id)

    @router.get(f"{prefix}/{{id}}/image", response_class=FileResponse, summary=f"The {what} file, by id")
    async def image(id: number, service: Service) -> FileResponse:
        return FileResponse(service.image_file(kind, id), headers=THUMB_HEADERS)

    @router.get(f"{prefix}/{{id}}/thumb", response_class=Response, summary=f"A small JPEG of the {what}",
                responses={200: {"content": {"image/jpeg": {}}}})
    async def thumb(id: number, service: Service) -> Response:
        data = await run_in_threadpool(service.thumbnail, kind, id)
        return Response(data, media_type="image/jpeg", headers=THUMB_HEADERS)


_image_routes("gallery", "/gallery", ItemId)
_image_routes("query", "/queries", QueryNumber)


@router.get("/uploads/{token}/thumb", response_class=Response, summary="A small JPEG of an uploaded query",
            responses={200: {"content": {"image/jpeg": {}}}})
async def upload_thumb(token: Annotated[str, Path(pattern="^[0-9a-f]{16}$")], service: Service) -> Response:
    return Response(service.upload(token).thumbnail, media_type="image/jpeg", headers=THUMB_HEADERS)
