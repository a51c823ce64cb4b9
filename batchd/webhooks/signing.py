"""Standard Webhooks signatures: signing each attempt, and checking one the way a receiver should."""

from __future__ import annotations

import base64
import functools
import hmac
import time
from collections.abc import Mapping, Sequence

from batchd.config import Secret, decode_secret


def secret_key(secret: Secret) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    return _decoded(secret.reveal())


# Every attempt signs with the same few secrets: decoding one (base64, checked) cost about as
# much as the HMAC itself. Bounded, for the rare daemon whose reloads keep changing them.
@functools.lru_cache(maxsize=64)
def _decoded(value: str) -> bytes:
    return decode_secret(value)


def sign(secrets: Sequence[Secret], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<base64>` entry per secret."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    # hmac.digest: one call into OpenSSL, without the Python-level HMAC object per entry.
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(secret_key(secret), content, "sha256")).decode() for secret in secrets
    )


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
