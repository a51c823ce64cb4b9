"""Standard Webhooks signatures: signing each attempt, and checking one the way a receiver should."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence

from batchd.config import Secret, decode_secret


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


def verify(
    secrets: Sequence[str], headers: Mapping[str, str], body: bytes, *, now: float | None = None, tolerance_s: int = 300
) -> bool:
    """Check a received event the way a receiver should: fresh timestamp, any valid v1 signature."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        offered = lowered["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = {sign([Secret(s)], msg_id, timestamp, body) for s in secrets}
    return any(hmac.compare_digest(entry, want) for entry in offered for want in expected)
