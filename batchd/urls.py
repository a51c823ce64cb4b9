"""URLs batchd is given: characters no URL may hold, the normal form allow-lists compare, and
the redacted form everything shows.

Pure string work, no network. A webhook URL comes from the config (trusted) or from a spec
(whoever dropped the file): `unsafe_char` finds what must refuse either, `normalise_url` gives
the form in which a spec's URL is compared with `[inbox] allow_webhook_urls` and then called,
so that what was checked is what is contacted, and `redact_url` is the one way a URL reaches a
log line, a report or a command's output.
"""

from __future__ import annotations

import ipaddress
import re
import string
from typing import NamedTuple
from urllib.parse import urlsplit

import idna

__all__ = ["NormalURL", "normalise_url", "redact_url", "unsafe_char", "url_secrets"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# What a path may hold unescaped (RFC 3986 `pchar` and "/"); anything else is percent-encoded.
_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
#: Shown in place of a URL's credentials.
HIDDEN = "***"


def unsafe_char(url: str) -> str | None:
    """The first control character (C0, DEL, C1) or whitespace in `url`, or None.

    Such a URL breaks every attempt to send to it (httpx refuses it), and urllib would
    silently drop some of them (tab, CR, LF) before a check.
    """
    for char in url:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F or char.isspace():
            return char
    return None


class NormalURL(NamedTuple):
    """An http(s) URL in normal form (RFC 3986 §6.2.2): what an allow-list compares."""

    #: "http" or "https"
    scheme: str
    #: as given, without its "@"; "" when none
    userinfo: str
    #: lower case; an internationalised name in its IDNA (xn--) form; an IPv6 literal
    #: compressed, without brackets
    host: str
    #: explicit: 80 or 443 when the URL names none
    port: int
    #: percent-encoded unreserved characters decoded, other escapes in upper case, characters
    #: a path may not hold encoded, dot segments resolved; "/" when empty
    path: str
    #: as given (None: no "?"); the fragment is dropped, it is never sent
    query: str | None

    def geturl(self) -> str:
        """The URL to call: this normal form, the default port left out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if _DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        userinfo = f"{self.userinfo}@" if self.userinfo else ""
        query = "" if self.query is None else f"?{self.query}"
        return f"{self.scheme}://{userinfo}{host}{port}{self.path}{query}"

    def within(self, entry: NormalURL) -> bool:
        """Same scheme, host and port as `entry`, and a path under its path on a "/" boundary.

        An entry `/hook` takes `/hook` and `/hook/x`, never `/hookEVIL`; `/hook/` takes
        `/hook/x` but not `/hook`.
        """
        if (self.scheme, self.host, self.port) != (entry.scheme, entry.host, entry.port):
            return False
        prefix = entry.path if entry.path.endswith("/") else entry.path + "/"
        return self.path == entry.path or self.path.startswith(prefix)


def normalise_url(url: str) -> NormalURL:
    """`url` in normal form; ValueError when it is no http(s) URL with a host, or holds a
    control character, whitespace or a backslash (which some servers read as "/")."""
    if unsafe_char(url) is not None or "\\" in url:
        raise ValueError("a URL must not hold control characters, whitespace or backslashes")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("an http:// or https:// URL with a host is needed")
    port = parts.port  # ValueError when not a number in 0-65535
    path = _remove_dot_segments(_escapes(parts.path)) or "/"
    # (Escapes are in upper case by now.)
    if any(part in (".", "..") for segment in path.split("/") if "%2F" in segment for part in segment.split("%2F")):
        # `/hook/..%2Fadmin` is one segment here, but `/admin` to a server that decodes %2F first.
        raise ValueError("a dot segment beside an encoded slash (%2F) is ambiguous")
    return NormalURL(
        scheme=scheme,
        userinfo=parts.netloc.rpartition("@")[0],
        host=_host(parts.hostname),
        port=_DEFAULT_PORTS[scheme] if port is None else port,
        path=path,
        query=parts.query if "?" in url.partition("#")[0] else None,
    )


def _host(hostname: str) -> str:
    """urlsplit's hostname (lower case, no brackets) as it is contacted."""
    try:
        return ipaddress.IPv6Address(hostname).compressed
    except ValueError:
        pass
    if hostname.isascii():
        return _ESCAPE.sub(_unescape, hostname).lower()
    # As httpx sends it (IDNA 2008), so that the name compared is the name resolved and called.
    try:
        return idna.encode(hostname).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"not a valid international host name: {exc}") from None


def _unescape(escape: re.Match[str]) -> str:
    """One percent-escape in normal form: an unreserved character decoded (`%2e` is "."), any
    other in upper case (`%2f` is `%2F`, never "/")."""
    char = chr(int(escape.group(1), 16))
    return char if char in _UNRESERVED else escape.group().upper()


def _escapes(path: str) -> str:
    """A path's percent-escapes in normal form (`_unescape`), and what a path may not hold
    unescaped (non-ASCII, `"`, `{`, a `%` that starts no escape, …) percent-encoded."""
    out: list[str] = []
    at = 0
    for escape in _ESCAPE.finditer(path):
        out.append(_encode(path[at : escape.start()]))
        out.append(_unescape(escape))
        at = escape.end()
    out.append(_encode(path[at:]))
    return "".join(out)


def _encode(text: str) -> str:
    # A lone surrogate (from a spec's JSON) cannot be encoded: UnicodeEncodeError, a ValueError.
    return "".join(c if c in _PATH_CHARS else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4: `/a/./b/../c` is `/a/c`; `/hook/../admin` is `/admin`; never above `/`."""
    out: list[str] = []
    rest = path
    while rest:
        if rest.startswith("../"):
            rest = rest[3:]
        elif rest.startswith("./"):
            rest = rest[2:]
        elif rest.startswith("/./") or rest == "/.":
            rest = "/" + rest[3:]
        elif rest.startswith("/../") or rest == "/..":
            rest = "/" + rest[4:]
            if out:
                out.pop()
        elif rest in (".", ".."):
            rest = ""
        else:
            end = rest.find("/", 1)
            end = len(rest) if end == -1 else end
            out.append(rest[:end])
            rest = rest[end:]
    return "".join(out)


def redact_url(url: str) -> str:
    """`url` with its credentials hidden, for every log line, report and output that shows one.

    User info goes whole (`https://user:pass@h/` is `https://***@h/`), as does every value of
    the query and the fragment (`?token=abc&x=` is `?token=***&x=`; a bare `?abc` is `?***`).
    Works on any string, URL or not: nothing here raises.
    """
    start = url.find("://")
    start = 0 if start == -1 else start + 3
    end = min((i for i in (url.find(c, start) for c in "/?#") if i != -1), default=len(url))
    authority = url[start:end]
    if "@" in authority:
        authority = HIDDEN + authority[authority.rfind("@") :]
    rest, hash_, fragment = url[end:].partition("#")
    path, question, query = rest.partition("?")
    shown = url[:start] + authority + path
    if question:
        shown += "?" + _hide_values(query)
    if hash_:
        shown += "#" + _hide_values(fragment)
    return shown


def _hide_values(pairs: str) -> str:
    hidden = []
    for pair in pairs.split("&"):
        key, equals, value = pair.partition("=")
        if equals:
            hidden.append(f"{key}={HIDDEN if value else ''}")
        else:
            hidden.append(HIDDEN if pair else "")
    return "&".join(hidden)


def url_secrets(url: str) -> list[str]:
    """What `redact_url` hides in `url` (user info, query and fragment values), for the log
    scrubber to blank wherever else the URL might appear (an exception's message)."""
    start = url.find("://")
    start = 0 if start == -1 else start + 3
    end = min((i for i in (url.find(c, start) for c in "/?#") if i != -1), default=len(url))
    authority = url[start:end]
    found = []
    if "@" in authority:
        userinfo = authority[: authority.rfind("@")]
        found += [userinfo, *userinfo.split(":")]
    rest, _, fragment = url[end:].partition("#")
    query = rest.partition("?")[2]
    for pairs in (query, fragment):
        for pair in pairs.split("&"):
            key, equals, value = pair.partition("=")
            found.append(value if equals else key)
    return [s for s in found if s]
