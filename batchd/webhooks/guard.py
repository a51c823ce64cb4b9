"""The SSRF guard for a spec's `webhook_url`: the allow-list match, and one checked, pinned address.

A spec's URL comes from whoever dropped the file. It must match an `[inbox]
allow_webhook_urls` entry, compared in normal form (batchd.urls), and its host is resolved
once per attempt: every address is checked and the request goes to exactly the checked one,
at the normalised URL (README, "Decisions").
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

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


def _non_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    cgnat = ipaddress.ip_network("100.64.0.0/10")
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
        or (isinstance(address, ipaddress.IPv4Address) and address in cgnat)
    )


class Refused(Exception):
    """A spec-provided URL that must not be contacted."""


async def pinned_target(url: str, allow_list: Sequence[str]) -> tuple[str, str]:
    """Resolve a spec webhook URL once and check every address; return (its normal form with
    the IP in place of the host, the host resolved).

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
    infos = await anyio.getaddrinfo(host, normal.port, type=socket.SOCK_STREAM)
    if not infos:
        raise Refused(f"{host} does not resolve")
    explicit = normalise_url(entry).host
    chosen: str | None = None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]))
        if _non_public(address) and str(address) != explicit:
            raise Refused(f"{host} resolves to non-public address {address}")
        chosen = chosen or str(address)
    assert chosen is not None
    return normal._replace(host=chosen).geturl(), host
