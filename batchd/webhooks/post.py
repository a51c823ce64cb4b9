"""One signed POST of an event, and what it ended with; never raises for the network or the receiver.

The SSRF guard is called through its module (`guard.pinned_target`), so that whoever
replaces it there (a test standing in for DNS or for the guard) replaces it here too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx

from batchd.backoff import retry_after_s
from batchd.config import Secret
from batchd.urls import normalise_url
from batchd.webhooks import guard
from batchd.webhooks.signing import sign

#: An answer's body is read up to this many bytes, for this long, so its connection can be reused.
DRAIN_BYTES = 64 * 1024
DRAIN_S = 0.5
#: httpx's per-wait timeouts, all off (see post_event: the attempt has a deadline of its own).
NO_TIMEOUT = httpx.Timeout(None).as_dict()


@dataclass(frozen=True)
class Outcome:
    """What one attempt ended with."""

    status: int | None
    error: str | None
    retry_after: float | None = None
    #: the first bytes of the answer's body, when asked for (`batchd webhooks test`)
    excerpt: bytes = b""


async def post_event(
    http: httpx.AsyncClient,
    url: str,
    *,
    event_id: str,
    body: bytes,
    secrets: Sequence[Secret],
    timestamp: int,
    timeout_s: float,
    allow_list: Sequence[str] | None = None,
    peek: int = 0,
    resolver: guard.Resolver | None = None,
) -> Outcome:
    """One signed POST of an event; never raises for what the network or the receiver does.

    `allow_list` is given for a spec's URL (signed with the inbox secret): it is then checked,
    resolved (through `resolver`, a DNS cache, when given) and pinned (the SSRF guard). `peek`
    keeps that many first bytes of the answer.
    """
    headers = {
        "content-type": "application/json",
        "user-agent": "batchd-webhooks",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, event_id, timestamp, body),
    }
    target = url
    extensions: dict[str, Any] = {}
    status: int | None = None
    retry_after: float | None = None
    excerpt = b""
    # timeout_s bounds the whole attempt (resolving included). httpx's timeout bounds each
    # network wait only, so a receiver sending a byte now and then held the attempt, and a
    # slot of its endpoint, for as long as it liked. httpx is given none: each of its waits
    # would set up (and cancel) a timer of its own, inside this deadline anyway.
    with anyio.move_on_after(timeout_s):
        try:
            if allow_list is not None:
                # Resolve once, check, and connect to exactly the checked address.
                # Positional: a stand-in guard (tests) takes what the real one takes.
                target, _host = await guard.pinned_target(url, allow_list, resolver)
                headers["host"], extensions["sni_hostname"] = _host_and_sni(url)
            # The request is whole as built here (its headers, no timeout, never redirected): sent
            # as is, without the client's merging of defaults into it, which cost as much as the
            # rest of httpx's work on a delivery.
            extensions["timeout"] = NO_TIMEOUT
            request = httpx.Request("POST", _parsed(target), headers=headers, content=body, extensions=extensions)
            response = await http.send(request, stream=True, follow_redirects=False)
            try:
                status, retry_after = response.status_code, retry_after_s(response.headers, now=datetime.now(UTC))
                excerpt = await _drain(response, peek)
            finally:
                await response.aclose()
        except guard.Refused as exc:
            return Outcome(None, f"refused: {exc}")
        except httpx.TimeoutException:
            pass  # (httpx sets no timeout here; a transport's own) the same failure as the deadline below
        except (httpx.HTTPError, OSError) as exc:
            if status is None:
                return Outcome(None, f"{type(exc).__name__}: {exc}")
    if status is None:
        return Outcome(None, f"timed out: no answer within {timeout_s:g} s")
    return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}", retry_after, excerpt)


@functools.lru_cache(maxsize=1024)
def _parsed(url: str) -> httpx.URL:
    """A URL parsed once: deliveries go to the same few URLs again and again (httpx.URL is immutable)."""
    return httpx.URL(url)


@functools.lru_cache(maxsize=1024)
def _host_and_sni(url: str) -> tuple[str, str]:
    """The Host header and TLS server name of a pinned request: those of the URL checked (its
    normal form), in their ASCII (IDNA) form: a header must be ASCII, and "bücher.example"
    raised UnicodeEncodeError. Cached: the same few spec URLs are called again and again."""
    original = httpx.URL(normalise_url(url).geturl())
    return original.netloc.decode("ascii"), original.raw_host.decode("ascii")


async def _drain(response: httpx.Response, peek: int) -> bytes:
    """Read a little of the answer's body, keeping its first `peek` bytes.

    Only the status and Retry-After count. Yet a connection whose answer was not read to its
    end cannot be reused: every delivery paid for a new TCP (and TLS) handshake. So up to
    DRAIN_BYTES are read for DRAIN_S at most; a larger or slower body just closes the
    connection, costing neither memory nor much time.
    """
    kept = bytearray()
    read = 0
    with anyio.move_on_after(DRAIN_S):
        try:
            async for chunk in response.aiter_raw():
                if len(kept) < peek:
                    kept += chunk[: peek - len(kept)]
                read += len(chunk)
                if read > DRAIN_BYTES:
                    break
        except httpx.HTTPError:
            pass  # the status is known; a body cut short changes nothing
    return bytes(kept)
