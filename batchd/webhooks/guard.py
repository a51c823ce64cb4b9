"""The SSRF guard for a spec's `webhook_url`: the allow-list match, and one checked, pinned address.

A spec's URL comes from whoever dropped the file. It must match an `[inbox]
allow_webhook_urls` entry, compared in normal form (batchd.urls), and its host is resolved
(at most once per DNS_TTL_S with a `Resolver`, else once per attempt): every address is
checked on every attempt and the request goes to exactly the checked one, at the normalised
URL (docs/design.md, "Decisions").
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence

import anyio

from batchd.urls import NormalURL, normalise_url, redact_url, unsafe_char


def allowed_webhook_url(url: str, allow_list: Sequence[str]) -> str | None:
    """The allow-list entry a spec's webhook_url matches, or None (see `checked_url`)."""
    checked = checked_url(url, allow_list)
    return None if checked is None else checked[1]


def checked_url(url: str, allow_list: Sequence[str]) -> tuple[NormalURL, str] | None:
    """A spec's webhook_url in normal form and the allow-list entry it matches, or None.

    Both are compared normalised (batchd.urls): scheme, host and port equal, and the path under
    the entry's path on a "/" boundary, after dot segments and escaped dots are resolved
    (`/hook/../admin` is `/admin`; `/hookEVIL` is not under `/hook`). A URL with user info,
    a control character, whitespace or a backslash matches nothing. The normal form is what
    is called, so that what was checked is what is contacted.
    """
    return _checked_url(url, tuple(allow_list))


# Pure, and asked again on every attempt to the same URL: normalising the URL and every entry
# cost more than the rest of the guard. Bounded: spec URLs differ per job.
@functools.lru_cache(maxsize=1024)
def _checked_url(url: str, allow_list: tuple[str, ...]) -> tuple[NormalURL, str] | None:
    # A user's URL that cannot be parsed matches nothing (an exception here would escape
    # Inbox.take and stop intake): normalise_url raises ValueError only.
    try:
        normal = normalise_url(url)
    except ValueError:
        return None
    if normal.userinfo:
        return None
    for entry in allow_list:
        try:
            allowed = normalise_url(entry)
        except ValueError:
            continue  # the config check refuses such entries; one that slips by allows nothing
        if normal.within(allowed):
            return normal, entry
    return None


def webhook_url_refusal(url: str, allow_list: Sequence[str]) -> str | None:
    """Why a spec's webhook_url is refused at intake (its text redacted), or None when it is allowed."""
    char = unsafe_char(url)
    if char is not None:
        return f"{redact_url(url)!r} holds a control character or whitespace ({char!r}); no request could carry it"
    if checked_url(url, allow_list) is None:
        return (
            f"{redact_url(url)!r} matches no entry of [inbox] allow_webhook_urls "
            "(scheme, host, port and path prefix, compared normalised)"
        )
    return None


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def _non_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
        or (isinstance(address, ipaddress.IPv4Address) and address in _CGNAT)
    )


class Refused(Exception):
    """A spec-provided URL that must not be contacted."""


#: How long a `Resolver` keeps a host's addresses. Resolving on every attempt cost a thread
#: trip (getaddrinfo blocks) per delivery; a rebinding attacker gains nothing from the wait,
#: since whatever is kept is checked again on every use and only a checked address is called.
DNS_TTL_S = 10.0
#: Hosts a `Resolver` keeps at most (spec URLs may name a new host per job).
DNS_CACHE_SIZE = 1024


class Resolver:
    """The addresses of a host, resolved at most once per `ttl_s` (a DNS cache for the guard).

    Only answers are kept, never verdicts: `pinned_target` checks the addresses on every use.
    A lookup that fails or finds nothing is not kept. `clock` is injected (seconds).
    """

    def __init__(
        self, *, ttl_s: float = DNS_TTL_S, size: int = DNS_CACHE_SIZE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._size = size
        self._clock = clock
        #: (host, port) -> (until when, addresses), oldest first
        self._answers: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}

    async def addresses(self, host: str, port: int) -> tuple[str, ...]:
        """The addresses `host` resolves to (empty when it resolves to none)."""
        now = self._clock()
        kept = self._answers.get((host, port))
        if kept is not None and now < kept[0]:
            return kept[1]
        found = await _resolve(host, port)
        if found:
            self._keep((host, port), (now + self._ttl_s, found), now)
        return found

    def _keep(self, key: tuple[str, int], answer: tuple[float, tuple[str, ...]], now: float) -> None:
        self._answers.pop(key, None)
        if len(self._answers) >= self._size:
            self._answers = {k: v for k, v in self._answers.items() if now < v[0]}
            while len(self._answers) >= self._size:
                del self._answers[next(iter(self._answers))]
        self._answers[key] = answer


async def _resolve(host: str, port: int) -> tuple[str, ...]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(str(info[4][0]) for info in infos)


async def pinned_target(url: str, allow_list: Sequence[str], resolver: Resolver | None = None) -> tuple[str, str]:
    """Resolve a spec webhook URL (through `resolver`, else afresh) and check every address;
    return (its normal form with the IP in place of the host, the host resolved).

    A non-public address passes only when the allow-list entry names that very
    IP literal: an operator who writes http://10.0.0.5:9000/ means it, while a
    DNS name that resolves inward is a rebinding attempt.
    """
    checked = checked_url(url, allow_list)
    if checked is None:
        raise Refused("URL is not in inbox.allow_webhook_urls")
    normal, entry = checked
    # The name checked, as httpx sends it (IDNA 2008): the socket module's own encoding of a
    # non-ASCII name is IDNA 2003, which can name another host ("straße" is "strasse" there).
    host = normal.host
    found = await (resolver.addresses(host, normal.port) if resolver is not None else _resolve(host, normal.port))
    if not found:
        raise Refused(f"{host} does not resolve")
    explicit = normalise_url(entry).host
    chosen: str | None = None
    for text in found:
        address = ipaddress.ip_address(text)
        if _non_public(address) and str(address) != explicit:
            raise Refused(f"{host} resolves to non-public address {address}")
        chosen = chosen or str(address)
    assert chosen is not None
    return normal._replace(host=chosen).geturl(), host
