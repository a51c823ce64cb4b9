"""`[metrics] token_file`: the token every route of the listener asks for (DESIGN §6), but a
provider's webhooks at `/hooks/NAME`, which are signed instead (batchd/hooks).

Accepted three ways, each compared in constant time with every configured token (the file
may hold several, one per line, during a rotation):

* `Authorization: Bearer TOKEN`: what Prometheus and scripts send;
* `?token=TOKEN` in the URL, so that a browser can open the page from a link;
* the `batchd_status` cookie, which an answer to a valid `?token=` sets.

Why a cookie rather than carrying `?token=` in every link of the page: the token then
appears in one URL only (the one the operator typed or bookmarked), not in every href, in
what the refresh script fetches, in each address the browser's history records, or in a
link copied into a chat; and the style sheet and the script load without it. The cookie
holds an HMAC of the token, not the token, is HttpOnly (no script reads it) and
SameSite=Strict (no other site's page makes the browser send it), and lasts for the browser
session. A `?token=` request is answered at once (no redirect), so that a scraper given the
token as a URL parameter works too.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from http.cookies import SimpleCookie

from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The cookie a valid ?token= sets.
COOKIE = "batchd_status"
_COOKIE_LABEL = b"batchd status page cookie v1"


def cookie_value(token: str) -> str:
    """What the cookie holds for `token`: a keyed hash, so the token itself is never stored."""
    return hmac.new(token.encode(), _COOKIE_LABEL, hashlib.sha256).hexdigest()


def _matches(given: str | None, expected: Sequence[str]) -> bool:
    """Whether `given` equals one of `expected`, in time that does not depend on where they differ."""
    if not given:
        return False
    found = False
    for value in expected:
        found |= hmac.compare_digest(given.encode(), value.encode())
    return found


class TokenGate:
    """ASGI middleware: 401 unless the request carries a configured token (see the module).

    Paths under `open_prefixes` pass without one: a provider's webhooks (`/hooks/NAME`) cannot
    carry batchd's token, and their route checks the provider's signature instead (batchd/hooks).
    """

    def __init__(self, app: ASGIApp, tokens: Sequence[str], open_prefixes: Sequence[str] = ()) -> None:
        self._app = app
        self._tokens = list(tokens)
        self._cookies = [cookie_value(t) for t in tokens]
        self._open = tuple(open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._tokens or (self._open and scope["path"].startswith(self._open)):
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _matches(bearer.strip(), self._tokens):
            await self._app(scope, receive, send)
            return
        given = QueryParams(scope.get("query_string", b"")).get("token")
        if given is not None and _matches(given, self._tokens):
            await self._app(scope, receive, _setting_cookie(send, given))
            return
        cookie = SimpleCookie(headers.get("cookie", "")).get(COOKIE)
        if cookie is not None and _matches(cookie.value, self._cookies):
            await self._app(scope, receive, send)
            return
        await _refuse(send)


def _setting_cookie(send: Send, token: str) -> Send:
    """`send`, with the cookie added to the answer's headers."""
    header = f"{COOKIE}={cookie_value(token)}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", header)]}
        await send(message)

    return sending


async def _refuse(send: Send) -> None:
    body = (
        b"401: this listener needs the token of [metrics] token_file: send `Authorization: Bearer TOKEN`, "
        b"or open the page once as /?token=TOKEN\n"
    )
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="batchd"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
