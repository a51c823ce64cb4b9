"""`POST /hooks/{name}`: a provider's signed batch event, taken as a hint to poll that batch now.

What is checked, in this order, and the answer when it fails (nothing is written then):

1. `name` is a configured provider with a `webhook_secret` (404 otherwise);
2. the Standard Webhooks headers are there (`webhook-id`, a whole-number `webhook-timestamp`:
   400; `webhook-signature`: 401) and the timestamp lies within 5 minutes of now (401);
3. the body is at most MAX_BODY_BYTES (413, read no further than that);
4. one of the offered signatures is the body's under one of the provider's secrets (401): any
   of them, so that a secret can be rotated;
5. the body is a JSON object (400).

Then the event is read (events.py). One that says a batch of this provider ended makes the job
polling it due now (`JobStore.hint`, which also wakes the daemon holding it through the jobs
signal) and wakes this daemon's scheduler; 200. An event of another type, or naming a batch
batchd does not poll, is logged and answered 200 too: the provider would otherwise send it
again and again. A database that cannot take the write is a 503: the provider sends it again.

These routes are exempt from `[metrics] token_file`'s token (status/auth.py): a provider cannot
send one; the signature is their authentication.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from batchd import metrics
from batchd.config import Settings
from batchd.faults import describe
from batchd.hooks.events import BadEvent, Hint, read_event
from batchd.store import Store
from batchd.webhooks.signing import Refusal, is_fresh, is_signed_by, read_headers

log = structlog.get_logger("batchd.hooks")

#: The largest event body taken (413 beyond): a batch event is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
#: The path prefix of the routes (the token gate leaves it open).
PREFIX = "/hooks/"


def hooked_providers(settings: Settings) -> list[str]:
    """The names of the providers whose events are taken: those with a `webhook_secret`."""
    return [
        name
        for name in settings.provider_names
        if (provider := settings.provider_named(name)) is not None and provider.webhook_secrets
    ]


def hook_routes(
    store: Store,
    settings: Callable[[], Settings],
    *,
    wake: Callable[[], None],
    clock: Callable[[], float] = time.time,
) -> list[BaseRoute]:
    """`POST /hooks/{name}` over `store`; `settings` gives the current config (each provider's kind
    and secrets), `wake` tells this daemon's scheduler that a job was made due, `clock` says now."""

    async def receive(request: Request) -> Response:
        name = request.path_params["name"]
        provider = settings().provider_named(name)
        if provider is None or not provider.webhook_secrets:
            return _refused(request, 404, "no provider of that name takes webhooks here")
        signed = read_headers(request.headers)
        if signed is Refusal.MALFORMED:
            return _refused(request, 400, "webhook-id and a whole-number webhook-timestamp are needed", name)
        if isinstance(signed, Refusal):
            return _refused(request, 401, "the event is not signed (webhook-signature)", name)
        if not is_fresh(signed, clock()):
            return _refused(request, 401, "webhook-timestamp is more than 5 minutes from now", name)
        body = await _read_capped(request, MAX_BODY_BYTES)
        if body is None:
            return _refused(request, 413, f"the body is larger than {MAX_BODY_BYTES} bytes", name)
        if not is_signed_by(signed, [s.reveal() for s in provider.webhook_secrets], body):
            return _refused(request, 401, "no signature matches a secret of this provider", name)
        try:
            event = read_event(provider.kind, body)
        except BadEvent as exc:
            return _refused(request, 400, str(exc), name)
        bound = log.bind(provider=name, webhook_id=signed.msg_id[:64])
        if not isinstance(event, Hint):
            bound.info("hooks.ignored", type=event.type, reason=event.reason)
            metrics.provider_hook(name, "ignored")
            return JSONResponse({"status": "ignored", "reason": event.reason})
        return await _hint(store, wake, name, event, bound)

    return [Route(PREFIX + "{name}", receive, methods=["POST"])]


async def _hint(store: Store, wake: Callable[[], None], name: str, event: Hint, bound: Any) -> Response:
    """Make the job polling the event's batch due now; the answer for the provider."""
    try:
        job_id = await anyio.to_thread.run_sync(store.jobs.hint, name, event.remote_id)
    except Exception as exc:
        # The database is away: the provider sends the event again later (polling goes on anyway).
        bound.warning("hooks.not_recorded", remote_batch_id=event.remote_id, error=describe(exc))
        metrics.provider_hook(name, "failed")
        return JSONResponse({"status": "not recorded, send it again"}, status_code=503)
    if job_id is None:
        bound.info("hooks.unknown_batch", type=event.type, remote_batch_id=event.remote_id)
        metrics.provider_hook(name, "unknown_batch")
        return JSONResponse({"status": "no batch of that id is being polled"})
    wake()
    bound.info("hooks.hint", type=event.type, remote_batch_id=event.remote_id, job_id=job_id)
    metrics.provider_hook(name, "polled")
    return JSONResponse({"status": "polling"})


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The request's body, or None as soon as it is known to pass `limit` bytes (never holding more)."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            return None
        body += chunk
    return bytes(body)


def _refused(request: Request, status: int, why: str, provider: str | None = None) -> Response:
    """A refusal: said in the log and the metrics (a known provider's), nothing written."""
    log.info("hooks.refused", status=status, reason=why, provider=provider, path=request.url.path[:100])
    if provider is not None:
        metrics.provider_hook(provider, "refused")
    # A body left unread (or partly read) is not drained to keep the connection: it is closed.
    return JSONResponse({"error": why}, status_code=status, headers={"connection": "close"})
