"""``cgpn serve``: a gallery-search web page and JSON API over an index (FastAPI, uvicorn, Jinja2).

``create_app(SearchService.open("gallery.faiss"))`` is the application; ``cgpn serve`` runs it on
127.0.0.1. The templates and the stylesheet are files of this package: the page needs no network.
"""

from cgpn.serve.app import check_settings, create_app, listen, serve
from cgpn.serve.service import SearchService

__all__ = ["SearchService", "check_settings", "create_app", "listen", "serve"]
