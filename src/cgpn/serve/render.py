"""The page templates (shipped in the package) and the one shape of every refused request: JSON
``{"detail": ...}`` for the API, an HTML page with the same line for a person."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.templating import Jinja2Templates

__all__ = ["TEMPLATES", "error_response", "is_api", "render"]

TEMPLATES = Jinja2Templates(env=Environment(loader=PackageLoader("cgpn.serve", "templates"),  # a name missing
                                            autoescape=select_autoescape(default=True),  # from the context is
                                            undefined=StrictUndefined))  # an error, not an empty string
_API_PREFIXES = ("/api/", "/openapi.json")


def is_api(scope: dict) -> bool:
    """Whether a request is for the JSON API (else it is for a page a person reads)."""
    return str(scope.get("path", "")).startswith(_API_PREFIXES)


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    """Render template ``name``; every template gets ``root`` (the app's mount path) for its links."""
    return TEMPLATES.TemplateResponse(request, name, {"root": request.scope.get("root_path", ""), **context},
                                      status_code=status_code)


def error_response(scope: dict, status: int, message: str) -> Response:
    """A refused request: ``{"detail": message}`` for the API, the error page for a person."""
    if is_api(scope):
        return JSONResponse({"detail": message}, status_code=status)
    return render(Request(scope), "error.html", status_code=status, title=f"Error {status}", status=status,
                  message=message)
