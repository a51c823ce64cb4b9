"""The status page's routes, added to the `[metrics] listen` app (batchd/health.py).

Reads run in a worker thread (the store is synchronous): a slow database delays the page,
never the daemon's event loop. Every answer says `Content-Security-Policy: default-src 'self'`:
even a value that escaped escaping could run no script and load nothing from elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib.resources import files

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from batchd.config import Settings
from batchd.status.pages import job_page, listing_page, not_found_page
from batchd.status.queries import Filter, read_job, read_listing
from batchd.store import Store

#: The files under static/ the page uses, and their media types: nothing else is served.
STATIC = {"refresh.js": "text/javascript; charset=utf-8", "status.css": "text/css; charset=utf-8"}
#: What every page may load and run: this listener's own files, nothing inline.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _static(name: str) -> bytes:
    return (files("batchd.status") / "static" / name).read_bytes()


def status_routes(
    store: Store, settings: Callable[[], Settings], *, clock: Callable[[], float] = time.time
) -> list[BaseRoute]:
    """`/`, `/jobs/{id}` and `/static/{name}` over `store`; `settings` gives the current config
    (the webhook endpoints, the lease that says a daemon is gone)."""
    assets = {name: _static(name) for name in STATIC}

    async def listing(request: Request) -> Response:
        query = Filter.parse(request.query_params.get("state"), request.query_params.get("q"))
        found = await anyio.to_thread.run_sync(lambda: read_listing(store, settings(), query, now=clock()))
        return HTMLResponse(listing_page(found), headers=SECURITY_HEADERS)

    async def job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        now = clock()
        found = await anyio.to_thread.run_sync(lambda: read_job(store, job_id, now=now))
        if found is None:
            return HTMLResponse(not_found_page(job_id, now), status_code=404, headers=SECURITY_HEADERS)
        return HTMLResponse(job_page(found), headers=SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return Response("not found\n", status_code=404, media_type="text/plain")
        return Response(assets[name], media_type=STATIC[name], headers={"x-content-type-options": "nosniff"})

    return [
        Route("/", listing),
        Route("/jobs/{job_id}", job),
        Route("/static/{name}", static),
    ]
