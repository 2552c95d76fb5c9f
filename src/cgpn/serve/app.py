"""The application: ``create_app`` puts the API, the pages, the static files and the error handling
around a ``SearchService``; ``listen`` and ``serve`` run it with uvicorn on a socket bound beforehand.

Every refused request, whatever refused it (a check of ours, pydantic's validation, an unknown route, the
body limit), answers one line: ``{"detail": ...}`` with a 4xx status for the API, an HTML page with that
line for a person; the server keeps serving.

Example:
    >>> app = create_app(SearchService.open("gallery.faiss"))
    >>> serve(app, listen("127.0.0.1", 8000))
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from cgpn import __version__
from cgpn.config import ServeSettings
from cgpn.errors import CgpnError, ConfigError, RequestError
from cgpn.serve import api, pages
from cgpn.serve.render import error_response
from cgpn.serve.service import SearchService
from cgpn.serve.uploads import BodyLimit

__all__ = ["check_settings", "create_app", "listen", "serve"]

logger = logging.getLogger(__name__)

DESCRIPTION = """Search a re-identification gallery (an index built by `cgpn index build`) by image or by
feature. Images are served by index id only. Every refused request answers `{"detail": "..."}` with a 4xx
status. The search page for a person is at `/`."""


def check_settings(settings: ServeSettings) -> None:
    """A ConfigError, before anything is loaded, for a setting out of its range."""
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"--port must be between 0 (any free port) and 65535, got {settings.port}")
    if not settings.max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb must be above 0, got {settings.max_upload_mb}")
    for name in ("max_pixels", "max_topk", "per_page", "max_batch", "uploads_kept"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")


def create_app(service: SearchService) -> FastAPI:
    """The FastAPI application over ``service`` (closed when the application shuts down)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    # FastAPIOffline: the OpenAPI page (/docs) with Swagger UI's files from a package, not a CDN
    app = FastAPIOffline(title="cgpn gallery search", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=int(service.settings.max_upload_mb * 2**20), respond=error_response)
    app.mount("/static", StaticFiles(packages=[("cgpn.serve", "static")]), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> Response:
        return error_response(request.scope, err.status, str(err))

    @app.exception_handler(CgpnError)
    async def user_error(request: Request, err: CgpnError) -> Response:
        return error_response(request.scope, 422, str(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> Response:
        return error_response(request.scope, 422, api.validation_message(list(err.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        if err.status_code == 404:
            message = (f"nothing at {request.url.path[:100]}: the search page is at /, the API under /api (documented "
                       f"at /docs); images are fetched by id, e.g. /api/gallery/0/image")
        elif err.status_code == 405:
            message = f"{request.method} is not accepted at {request.url.path[:100]}"
        else:
            message = str(err.detail)
        return error_response(request.scope, err.status_code, message)

    app.add_middleware(NoSniff)  # outermost: refusals of BodyLimit get the header too
    return app


class NoSniff:
    """ASGI middleware: every response says ``X-Content-Type-Options: nosniff``, so a browser renders what the
    server says a file is, never a guess. Plain ASGI: Starlette's ``@app.middleware("http")`` runs each request
    in a task group of its own (about a fifth of the server's per-request CPU in a py-spy profile)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_nosniff(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, send_nosniff)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port), or a ConfigError saying why not.

    Bound before the network is loaded, so that a port in use is reported at once; connections made
    while the server starts wait in the socket's queue.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as err:
        raise ConfigError(f"cannot listen on host '{host}': {err} (e.g. --host 127.0.0.1)") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err} (pick another --port, or 0 for "
                          f"any free one)") from None
    if not ipaddress.ip_address(address[0]).is_loopback:
        logger.warning("listening on %s: other machines can reach this server, which has no authentication", host)
    return sock


# How long a Python thread may hold the GIL while another waits for it (Python's default: 5 ms). The search
# thread runs Python between its torch calls; with the default, an answer ready on the event loop could wait
# 5 ms for the GIL, several times per request. benchmarks/serve_load.py, 2 cores, 10 s phases, two runs each:
# p99 at 32 clients 384-408 ms at 5 ms, 379-451 at 1 ms, 208-258 at 0.2 ms; at 4 clients 60-64 / 45-51 / 44-50.
SWITCH_INTERVAL = 0.0002
# Python's full garbage collection scans every object the process holds: with the network, the index and the
# app loaded (590,000 objects) one took 220-250 ms, GIL held, in a check on the 2-core Xeon; after gc.freeze()
# 0.0 ms. Python runs one when the objects surviving since the last reach a quarter of the long-lived ones:
# rare while serving (none in 22 s of serve_load), but a stall of every request when it comes.


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` with uvicorn until Ctrl-C (or SIGTERM), handing the GIL over every
    ``SWITCH_INTERVAL`` seconds, with what exists at the start frozen out of garbage collection (both undone
    on return)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.collect()
    gc.freeze()  # what the start made (network, index, routes) is never scanned again
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then raises it again: a normal stop
        logger.info("stopped")
    finally:
        sys.setswitchinterval(interval)
        gc.unfreeze()
