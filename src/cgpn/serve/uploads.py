"""What the server accepts from a client: request bodies up to a size, and images checked by decoding.

An upload is judged by its content, never by its name or declared type: its header must name an image
format PIL reads, its width x height must be within the limit before a pixel is decoded (a small PNG can
unpack to gigabytes: a decompression bomb), and it must then decode whole (a truncated file is refused,
not padded with grey).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image, UnidentifiedImageError

from cgpn.data.loader import DECODE_ERRORS
from cgpn.errors import RequestError

__all__ = ["FORMATS", "BodyLimit", "decode_upload"]

FORMATS = ("JPEG", "PNG", "BMP", "WEBP")  # what an upload may be (by its decoded header)
_HINT = "send a JPEG, PNG, BMP or WebP image"


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB image in ``data``, decoded as ``cgpn search`` decodes a file, or a RequestError (4xx).

    Args:
        data: the uploaded bytes.
        max_pixels: largest width x height accepted (checked on the header, before decoding).
    """
    if not data:
        raise RequestError(f"the upload is empty; {_HINT}", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as err:
        raise RequestError(f"the image is too large to decode ({err}); {_HINT} of at most {max_pixels:,} "
                           f"pixels", 413) from None
    except UnidentifiedImageError:
        raise RequestError(f"the upload is not an image (its {len(data):,} bytes start with {data[:8]!r}); "
                           f"{_HINT}", 415) from None
    if img.format not in FORMATS:
        raise RequestError(f"the upload is a {img.format} image; {_HINT}", 415)
    width, height = img.size
    if width * height > max_pixels:
        raise RequestError(f"the image is {width} x {height} = {width * height:,} pixels, over the limit of "
                           f"{max_pixels:,} (a decompression bomb, or a photo to crop to the person first)", 413)
    if img.mode.startswith(("I", "F")):  # 16-bit or float pixels: converting to 8-bit RGB would saturate them
        raise RequestError(f"the image has {img.mode} pixels (16-bit or float); save it as 8-bit RGB and "
                           f"{_HINT}", 415)
    try:
        return img.convert("RGB")  # decodes every pixel: a truncated or corrupt file fails here
    except DECODE_ERRORS as err:
        raise RequestError(f"the upload is not a complete {img.format} image ({err}); send the whole file",
                           400) from None


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
Responder = Callable[[dict, int, str], Any]  # (scope, status, message) -> an ASGI response


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413, before it is read whole.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked body as soon
    as its running count passes the limit (nothing is written to disk beyond it).

    Args:
        app: the application to protect.
        max_bytes: the largest body accepted.
        respond: (scope, status, message) -> the response to send (JSON for the API, HTML for pages).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, respond: Responder) -> None:
        self.app, self.max_bytes, self.respond = app, max_bytes, respond

    def _message(self, size: str) -> str:
        return (f"the request body is {size}, over the limit of {self.max_bytes:,} bytes; send a smaller image "
                f"(cgpn serve --max-upload-mb raises the limit)")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.respond(scope, 413, self._message(f"{int(declared):,} bytes"))(scope, receive, send)
            return
        received, started = 0, False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self.respond(scope, 413, self._message(f"over {received:,} bytes"))(scope, receive, send)
