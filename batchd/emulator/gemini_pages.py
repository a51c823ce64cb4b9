"""Paging of the Gemini dialect's lists: `pageSize` and `pageToken` in, `nextPageToken` out.

A page token is opaque to the client: base64url of the place of the page's last item in the
list (its creation time in microseconds and its sequence number). The next page starts just
after that place, whatever was created or deleted meanwhile: a newer item lands on the first
page, a deleted one leaves no gap, and a token never goes stale.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

T = TypeVar("T")
#: Where an item stands in a list sorted newest first: (creation time in µs, sequence number).
Place = tuple[int, int]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PageProblem(ValueError):
    """A pageSize or pageToken the list cannot take (answered 400 INVALID_ARGUMENT)."""


def micros(moment: datetime) -> int:
    """A moment as whole microseconds since the epoch (exact, unlike a float timestamp)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def page_size(raw: str | None, default: int, largest: int) -> int:
    """The page size asked for: absent or 0 → `default`; above `largest` → `largest`, as Google caps it."""
    if raw is None or raw == "":
        return default
    try:
        size = int(raw)
    except ValueError:
        raise PageProblem(f"pageSize must be an integer, not {raw!r}") from None
    if size < 0:
        raise PageProblem("pageSize must not be negative")
    return min(size, largest) if size else default


def _token(place: Place) -> str:
    return base64.urlsafe_b64encode(f"{place[0]}.{place[1]}".encode()).decode().rstrip("=")


def _place(token: str) -> Place:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, seq = text.split(".")
        return int(created), int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise PageProblem("pageToken is not a token this list gave out") from None


def page(items: Sequence[T], place: Callable[[T], Place], token: str | None, size: int) -> tuple[list[T], str | None]:
    """The page of `items` (newest first) after the token's place, and the next page's token (None
    when this page reaches the end)."""
    start = 0
    if token:
        after = _place(token)
        start = next((i for i, item in enumerate(items) if place(item) < after), len(items))
    chosen = list(items[start : start + size])
    more = start + size < len(items)
    return chosen, _token(place(chosen[-1])) if more and chosen else None
