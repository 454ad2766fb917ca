"""Static pages the gateway serves besides the playground: its scripts under /static/ and browser examples under
/examples/ (same origin as the API, so they run as given: no CORS, no absolute URLs)."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"
EXAMPLES_DIR = STATIC_DIR / "examples"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css)$")
_NO_CACHE = {"Cache-Control": "no-cache"}


def _file(directory: Path, name: str) -> web.FileResponse:
    # A fixed name pattern: no dots or slashes beyond the extension, so no path can leave the directory.
    if not _NAME.match(name) or not (directory / name).is_file():
        raise web.HTTPNotFound(
            text='{"error": {"code": "not_found", "message": "no such page"}}', content_type="application/json"
        )
    return web.FileResponse(directory / name, headers=_NO_CACHE)


async def static_file(request: web.Request) -> web.FileResponse:
    return _file(STATIC_DIR, request.match_info["name"])


async def example(request: web.Request) -> web.FileResponse:
    return _file(EXAMPLES_DIR, request.match_info.get("name") or "index.html")


def add_routes(app: web.Application) -> None:
    """Register /static/{name}, /examples/ and /examples/{name}."""
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/examples/", example)
    app.router.add_get("/examples/{name}", example)
