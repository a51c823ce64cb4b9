"""The emulator's own provider webhooks: a signed event when a batch ends, as OpenAI and Gemini send.

A target per dialect (`openai`, `gemini`): a URL and its Standard Webhooks secret (`whsec_…`).
When a batch created through that dialect ends, the target gets one event, POSTed in the
background (the worker never waits for it), signed like the providers sign theirs:
`webhook-id` (the event's id, the same on every attempt), `webhook-timestamp` (unix seconds,
fresh on every attempt), `webhook-signature` (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`).
Best effort: an attempt without an answer, or answered 429 or 5xx, is tried again after
RETRY_DELAYS_S; any other answer (a 401 included) ends it. What was sent and how it was
answered is counted (`/_emulator/stats`, `provider_webhooks`).

The bodies (`event_body`):

* OpenAI: `{"id": "evt_…", "object": "event", "created_at": <unix s>, "type": "batch.completed" |
  "batch.failed" | "batch.expired" | "batch.cancelled", "data": {"id": "batch_…"}}`, as OpenAI
  documents them.
* Gemini: `{"id": "evt_…", "type": "batch.succeeded" | "batch.failed" | "batch.expired" |
  "batch.cancelled", "version": "v1", "timestamp": "<RFC 3339>", "data": {"id": "<id>", "name":
  "batches/<id>", "state": "BATCH_STATE_…"}}`. Google documents these event types and the
  Standard Webhooks headers, not where the batch's name sits in `data`: the emulator says it
  both ways (batchd reads either, see batchd/hooks/events.py).

Self-contained, as the rest of the emulator: the signature is made here, not by batchd's own
webhook code (the tests check it with the `standardwebhooks` package).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import structlog
from anyio.abc import TaskGroup, TaskStatus

from batchd.emulator.state import BatchStatus, StoredBatch, iso_z

log = structlog.get_logger()

#: The dialects whose batches announce their end.
DIALECTS = ("openai", "gemini")
#: Waits before the second and third attempts of an event that got no answer, a 429 or a 5xx.
RETRY_DELAYS_S = (0.5, 2.0)
#: One attempt's time limit.
TIMEOUT_S = 5.0
#: The event type of each ending, per dialect.
EVENT_TYPES: dict[str, dict[BatchStatus, str]] = {
    "openai": {
        BatchStatus.COMPLETED: "batch.completed",
        BatchStatus.FAILED: "batch.failed",
        BatchStatus.EXPIRED: "batch.expired",
        BatchStatus.CANCELLED: "batch.cancelled",
    },
    "gemini": {
        BatchStatus.COMPLETED: "batch.succeeded",
        BatchStatus.FAILED: "batch.failed",
        BatchStatus.EXPIRED: "batch.expired",
        BatchStatus.CANCELLED: "batch.cancelled",
    },
}
_GEMINI_STATES = {
    BatchStatus.COMPLETED: "BATCH_STATE_SUCCEEDED",
    BatchStatus.FAILED: "BATCH_STATE_FAILED",
    BatchStatus.EXPIRED: "BATCH_STATE_EXPIRED",
    BatchStatus.CANCELLED: "BATCH_STATE_CANCELLED",
}


@dataclass(frozen=True)
class HookTarget:
    """Where a dialect's batch events go, and the secret that signs them."""

    dialect: str
    url: str
    secret: str

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, not {self.dialect!r}")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http(s) URL, not {self.url!r}")
        _key(self.secret)

    def describe(self) -> dict[str, str]:
        """What `/_emulator/provider-webhooks` shows of it: never the secret."""
        return {"dialect": self.dialect, "url": self.url}


def parse_target(spec: object) -> HookTarget:
    """A target from `{"dialect", "url", "secret"}` (a control request); ValueError when it is not one."""
    if not isinstance(spec, dict) or set(spec) != {"dialect", "url", "secret"}:
        raise ValueError('expected {"dialect": "openai" | "gemini", "url": "http…", "secret": "whsec_…"}')
    if not all(isinstance(spec[k], str) for k in spec):
        raise ValueError("dialect, url and secret are strings")
    return HookTarget(spec["dialect"], spec["url"], spec["secret"])


def _key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; ValueError for anything else."""
    if not secret.startswith("whsec_"):
        raise ValueError("secret must look like whsec_<base64>")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("the part of secret after whsec_ is not base64") from None
    if not key:
        raise ValueError("secret holds no key after whsec_")
    return key


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header of one attempt (one `v1` entry)."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event_body(batch: StoredBatch, event_id: str, now: datetime) -> bytes | None:
    """The event a batch's end sends in its dialect's shape (see the module); None when it sends none."""
    event_type = EVENT_TYPES.get(batch.dialect, {}).get(batch.status)
    if event_type is None:
        return None
    event: dict[str, Any]
    if batch.dialect == "openai":
        event = {
            "id": event_id, "object": "event", "created_at": int(now.timestamp()), "type": event_type,
            "data": {"id": batch.id},
        }  # fmt: skip
    else:
        event = {
            "id": event_id, "type": event_type, "version": "v1", "timestamp": iso_z(now),
            "data": {"id": batch.id, "name": f"batches/{batch.id}", "state": _GEMINI_STATES[batch.status]},
        }  # fmt: skip
    return json.dumps(event).encode()


class ProviderHooks:
    """The targets, and the deliveries under way: `batch_ended` is the worker's call, `run` their home."""

    def __init__(self, targets: Mapping[str, HookTarget], clock: Callable[[], datetime]) -> None:
        self._targets = dict(targets)
        self._clock = clock
        self._tg: TaskGroup | None = None
        self._http: httpx.AsyncClient | None = None
        #: events started, and each attempt's answer by status ("error": none came)
        self.events = 0
        self.answers: Counter[str] = Counter()

    def set(self, target: HookTarget) -> None:
        """Send `target.dialect`'s events to `target` from now on (in place of any earlier one)."""
        self._targets[target.dialect] = target

    def clear(self) -> None:
        """Send no events any more."""
        self._targets.clear()

    def describe(self) -> dict[str, Any]:
        """The targets (without their secrets) and the counts."""
        return {
            "targets": [t.describe() for t in self._targets.values()],
            "events": self.events,
            "answers": dict(self.answers),
        }

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Be the home of deliveries until cancelled (the app's lifespan); those under way end then."""
        async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT_S) as http, anyio.create_task_group() as tg:
            self._http, self._tg = http, tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._http, self._tg = None, None
                tg.cancel_scope.cancel()

    def batch_ended(self, batch: StoredBatch) -> None:
        """The worker ended `batch`: its dialect's target, if any, gets the event in the background."""
        target = self._targets.get(batch.dialect)
        if target is None:
            return
        event_id = f"evt_{secrets.token_hex(12)}"
        body = event_body(batch, event_id, self._clock())
        if body is None:
            return
        if self._tg is None or self._http is None:
            log.warning("emulator.provider_webhook.not_running", batch_id=batch.id)
            return
        self.events += 1
        self._tg.start_soon(self._deliver, self._http, target, event_id, body, batch.id)

    async def _deliver(
        self, http: httpx.AsyncClient, target: HookTarget, event_id: str, body: bytes, batch_id: str
    ) -> None:
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S), start=1):
            await anyio.sleep(delay)
            status = await self._attempt(http, target, event_id, body)
            self.answers["error" if status is None else str(status)] += 1
            log.info(
                "emulator.provider_webhook.sent", batch_id=batch_id, event_id=event_id, url=target.url,
                attempt=attempt, status=status,
            )  # fmt: skip
            if status is not None and status != 429 and status < 500:
                return

    async def _attempt(self, http: httpx.AsyncClient, target: HookTarget, event_id: str, body: bytes) -> int | None:
        """One POST of the event; its status, or None when no answer came."""
        timestamp = int(self._clock().timestamp())
        headers = {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(target.secret, event_id, timestamp, body),
        }
        try:
            answer = await http.post(target.url, content=body, headers=headers)
        except httpx.HTTPError:
            return None
        return answer.status_code
