"""The chat page: ``GET /`` and its assets under ``/static/``, built by ``scripts/build-web``.

The page (source in ``examples/web_chat``) talks to the gateway only through clients
generated from ``protos/`` over the Connect protocol (:mod:`tokenwire.edge.web`), so
it signs in, is refused and is moderated exactly as any other client. Its assets ship
inside this package, already built: serving them needs no Node.js.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = ["CHAT_PAGE_DIR", "chat_page_routes"]

CHAT_PAGE_DIR = Path(__file__).with_name("chat_page")
# The page runs only its own bundled script and talks only to this origin.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


async def _index(request: Request) -> Response:
    return FileResponse(CHAT_PAGE_DIR / "index.html", headers=_HEADERS)


def chat_page_routes(channel: grpc.aio.Channel | None = None) -> Sequence[Any]:
    """``/`` and ``/static/*``; ``channel`` is unused (the page calls the Connect routes).

    >>> routes = chat_page_routes()  # doctest: +SKIP
    """
    del channel
    if not (CHAT_PAGE_DIR / "index.html").is_file():
        return []  # a build without the page's assets: the APIs still serve
    return [
        Route("/", _index, methods=["GET", "HEAD"]),
        Mount("/static", app=StaticFiles(directory=CHAT_PAGE_DIR), name="chat-page"),
    ]
