"""Standard Webhooks signatures: signing each attempt, and checking one the way a receiver should.

The checks are split so that a receiver can refuse on the headers alone (`read_headers`,
`is_fresh`) before it reads a body, then check the body (`is_signed_by`); `check` and `verify`
do all of it at once. The time is always given (`now`, or a `clock`): tests never wait for one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from batchd.config import Secret, decode_secret

#: How far a received event's timestamp may be from now, either way (the Standard Webhooks advice).
TOLERANCE_S = 300.0


def new_secret() -> str:
    """A new Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: Secret) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    return decode_secret(secret.reveal())


# Every attempt signs with the same few secrets, so each one's HMAC is keyed once and copied per
# signature. hmac.digest and hmac.new set the key up every time (decoding the secret cost as
# much again), and hmac.digest lets go of the GIL even for a short message: in the daemon a
# database thread then took it, and the event loop waited for it to come back. Bounded, for
# the rare daemon whose reloads keep changing the secrets.
@functools.lru_cache(maxsize=64)
def _keyed(value: str) -> hmac.HMAC:
    return hmac.new(decode_secret(value), digestmod=hashlib.sha256)


def sign(secrets: Sequence[Secret], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<base64>` entry per secret."""
    prefix = f"{msg_id}.{timestamp}.".encode()
    entries = []
    for secret in secrets:
        mac = _keyed(secret.reveal()).copy()
        mac.update(prefix)
        mac.update(body)
        entries.append("v1," + base64.b64encode(mac.digest()).decode())
    return " ".join(entries)


@dataclass(frozen=True)
class Signed:
    """What a received event's Standard Webhooks headers say, before its body is read."""

    msg_id: str
    #: unix seconds, as the sender said
    timestamp: int
    #: the `webhook-signature` entries, as sent (`v1,<base64>` each)
    offered: tuple[str, ...]


class Refusal(StrEnum):
    """Why a received event is not taken as signed."""

    #: `webhook-id` or `webhook-timestamp` missing, or the timestamp not a whole number
    MALFORMED = "malformed"
    #: no `webhook-signature` at all
    UNSIGNED = "unsigned"
    #: the timestamp is further from now than the tolerance (a replay, or a clock far off)
    STALE = "stale"
    #: no offered signature is the body's under any of the secrets
    FORGED = "forged"


def read_headers(headers: Mapping[str, str]) -> Signed | Refusal:
    """The signature headers of a received event (names in any case), or why they will not do."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id", "").strip()
    stamp = lowered.get("webhook-timestamp", "").strip()
    if not msg_id or not stamp.isascii() or not stamp.isdigit():
        return Refusal.MALFORMED
    offered = tuple(lowered.get("webhook-signature", "").split())
    if not offered:
        return Refusal.UNSIGNED
    return Signed(msg_id, int(stamp), offered)


def is_fresh(signed: Signed, now: float, *, tolerance_s: float = TOLERANCE_S) -> bool:
    """Whether the event's timestamp lies within `tolerance_s` of `now` (either way)."""
    return abs(now - signed.timestamp) <= tolerance_s


def is_signed_by(signed: Signed, secrets: Sequence[str], body: bytes) -> bool:
    """Whether any offered `v1` signature is the body's under any of `secrets` (constant-time compares)."""
    expected = [sign([Secret(s)], signed.msg_id, signed.timestamp, body) for s in secrets]
    return any(hmac.compare_digest(entry, want) for entry in signed.offered for want in expected)


def check(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_s: float = TOLERANCE_S,
) -> Refusal | None:
    """Check a received event the way a receiver should: None when it is signed and fresh, else why not."""
    signed = read_headers(headers)
    if isinstance(signed, Refusal):
        return signed
    if not is_fresh(signed, now, tolerance_s=tolerance_s):
        return Refusal.STALE
    return None if is_signed_by(signed, secrets, body) else Refusal.FORGED


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    clock: Callable[[], float] = time.time,
    tolerance_s: float = TOLERANCE_S,
) -> bool:
    """Whether a received event is signed and fresh (at `now`, else at `clock()`'s time)."""
    return check(secrets, headers, body, now=clock() if now is None else now, tolerance_s=tolerance_s) is None
