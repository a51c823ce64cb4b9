"""The SSRF guard for a spec's `webhook_url`: the allow-list match, and one checked, pinned address.

A spec's URL comes from whoever dropped the file. It must match an `[inbox]
allow_webhook_urls` entry, and its host is resolved once per attempt: every address is
checked and the request goes to exactly the checked one (README, "Decisions").
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio


def allowed_webhook_url(url: str, allow_list: Sequence[str]) -> str | None:
    """The allow-list entry a spec's webhook_url matches (scheme, host, port, path prefix), or None."""
    # urlsplit raises on a bad IPv6 literal and .port on a port that is not a number in
    # 0-65535: a user's URL that cannot be parsed matches nothing (an exception here would
    # escape Inbox.take and stop intake).
    try:
        parts = urlsplit(url)
        port = _port(parts)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    for entry in allow_list:
        try:
            allowed = urlsplit(entry)
            allowed_port = _port(allowed)
        except ValueError:
            continue  # the config check does not look at ports; a bad entry allows nothing
        if (
            parts.scheme == allowed.scheme
            and parts.hostname == allowed.hostname
            and port == allowed_port
            and parts.path.startswith(allowed.path)
        ):
            return entry
    return None


def _port(parts: Any) -> int:
    return int(parts.port or (443 if parts.scheme == "https" else 80))


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
    """Resolve a spec webhook URL once and check every address; return (URL with the IP, host).

    A non-public address passes only when the allow-list entry names that very
    IP literal: an operator who writes http://10.0.0.5:9000/ means it, while a
    DNS name that resolves inward is a rebinding attempt.
    """
    entry = allowed_webhook_url(url, allow_list)
    if entry is None:
        raise Refused("URL is not in inbox.allow_webhook_urls")
    parts = urlsplit(url)
    host = parts.hostname or ""
    infos = await anyio.getaddrinfo(host, _port(parts), type=socket.SOCK_STREAM)
    if not infos:
        raise Refused(f"{host} does not resolve")
    explicit = urlsplit(entry).hostname
    chosen: str | None = None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]))
        if _non_public(address) and str(address) != explicit:
            raise Refused(f"{host} resolves to non-public address {address}")
        chosen = chosen or str(address)
    assert chosen is not None
    netloc = f"[{chosen}]" if ":" in chosen else chosen
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), host
