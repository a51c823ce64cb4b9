"""The webhook client: httpx over a keep-alive transport that looks only at the connection it takes.

httpx's own pool (httpcore's AsyncConnectionPool) re-examines every connection it holds on each
request and on each response closed: a poll() and a getpeername() per idle connection, and a
scan of all of them per connection, so the cost of a delivery grew with the connections open
(about 15 such syscalls a delivery at 4 in flight; far more at 16). Deliveries go to a few
endpoints over and over, so this transport keeps each origin's idle connections on a stack and
checks only the one it takes (closed, expired, or hung up by the receiver: then the next). The
HTTP/1.1 exchange is httpcore's, as in httpx's own transport, over connections of streams.py
(asyncio transports; a request leaves in one send).

`webhook_client()` builds the client the daemon and `batchd webhooks test` use.
"""

from __future__ import annotations

import http.cookiejar
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import anyio
import httpcore
import httpx

from batchd.providers.http import tls_context
from batchd.webhooks.streams import AsyncioBackend

#: Seconds an idle connection is kept for the next delivery (httpx's default).
KEEPALIVE_EXPIRY_S = 5.0
#: Idle connections kept per origin; more are closed when their answer has been read.
MAX_IDLE_PER_ORIGIN = 32
#: Requests in flight through one transport at once, all origins together (httpx's default
#: max_connections): a backlog spread over many spec URLs must not exhaust file descriptors.
MAX_IN_FLIGHT = 100

#: httpcore's errors as httpx's (what httpx's own transport raises); looked up along the MRO,
#: so the most specific class wins.
_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
}

# (scheme, host, port, TLS server name): a connection is reused for the very same peer only.
_Key = tuple[bytes, bytes, int | None, Any]


def _reraise(exc: Exception) -> NoReturn:
    """Raise the httpx error for an httpcore one (any other exception as it is)."""
    for cls in type(exc).__mro__:
        mapped = _ERRORS.get(cls)
        if mapped is not None:
            raise mapped(str(exc)) from exc
    raise exc


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over idle connections kept per origin (and TLS server name); no connect retries.

    `clock` (monotonic seconds) dates idle connections, for closing those unused for
    `keepalive_expiry_s` even when their origin is never called again.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
        max_idle_per_origin: int = MAX_IDLE_PER_ORIGIN,
        max_in_flight: int = MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ssl_context = ssl_context
        self._expiry_s = keepalive_expiry_s
        self._max_idle = max_idle_per_origin
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._backend = AsyncioBackend()
        #: idle connections per key, the most recently used last, each with when it became idle
        self._idle: dict[_Key, list[tuple[httpcore.AsyncHTTP11Connection, float]]] = {}
        #: connections carrying a request (closed with the transport)
        self._busy: set[httpcore.AsyncHTTP11Connection] = set()
        self._next_sweep = 0.0
        # Created on first use: anyio primitives need a running event loop.
        self._slots: anyio.Semaphore | None = None
        self._closed = False

    @property
    def idle_connections(self) -> int:
        """Connections open and waiting for a request (all origins)."""
        return sum(len(stack) for stack in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        key: _Key = (url.raw_scheme, url.raw_host, url.port, request.extensions.get("sni_hostname"))
        if self._slots is None:
            self._slots = anyio.Semaphore(self._max_in_flight)
        await self._acquire(self._slots, request)
        try:
            try:
                connection = await self._take(key, core)
            except Exception as exc:
                _reraise(exc)
            try:
                response = await connection.handle_async_request(core)
            except Exception as exc:
                await self._discard(connection)
                _reraise(exc)
            except BaseException:
                await self._discard(connection)
                raise
        except BaseException:
            self._slots.release()
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream, lambda: self._give_back(key, connection)),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        self._closed = True
        connections = [c for stack in self._idle.values() for c, _ in stack] + list(self._busy)
        self._idle.clear()
        self._busy.clear()
        with anyio.CancelScope(shield=True):
            for connection in connections:
                await connection.aclose()

    @staticmethod
    async def _acquire(slots: anyio.Semaphore, request: httpx.Request) -> None:
        # A slot is almost always free: taken at once, with no cancel scope and no timer to set up.
        try:
            slots.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        timeout = request.extensions.get("timeout", {}).get("pool")
        with anyio.move_on_after(timeout):
            await slots.acquire()
            return
        raise httpx.PoolTimeout(f"no connection free within {timeout} s", request=request)

    async def _take(self, key: _Key, core: httpcore.Request) -> httpcore.AsyncHTTP11Connection:
        """The most recently used idle connection for `key` still fit for a request, else a new one."""
        now = self._clock()
        if now >= self._next_sweep:
            await self._sweep(now)
        stack = self._idle.get(key)
        while stack:
            connection, _since = stack.pop()
            # has_expired: idle past its keep-alive, or the receiver hung up (readable while idle).
            if connection.is_idle() and not connection.has_expired():
                self._busy.add(connection)
                return connection
            await self._close(connection)
        # httpcore's HTTP/1.1 connection itself, on a stream connected here: its usual wrapper
        # (AsyncHTTPConnection) only connects, and takes a lock of its own on every request.
        stream = await self._connect(core)
        connection = httpcore.AsyncHTTP11Connection(
            origin=core.url.origin, stream=stream, keepalive_expiry=self._expiry_s
        )
        self._busy.add(connection)
        return connection

    async def _connect(self, core: httpcore.Request) -> httpcore.AsyncNetworkStream:
        """A new connection for `core` (TCP, then TLS for https to its `sni_hostname` or host), as
        httpcore connects; no retries."""
        timeout = core.extensions.get("timeout", {}).get("connect")
        origin = core.url.origin
        host = origin.host.decode("ascii")
        stream = await self._backend.connect_tcp(host, origin.port, timeout)
        if origin.scheme != b"https":
            return stream
        context = self._ssl_context if self._ssl_context is not None else tls_context()
        context.set_alpn_protocols(["http/1.1"])
        try:
            return await stream.start_tls(context, core.extensions.get("sni_hostname") or host, timeout)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise

    async def _give_back(self, key: _Key, connection: httpcore.AsyncHTTP11Connection) -> None:
        """After an answer was closed: keep its connection for the next request if it can take one."""
        self._busy.discard(connection)
        assert self._slots is not None
        self._slots.release()
        stack = self._idle.setdefault(key, [])
        # Not idle: the answer was not read to its end, or either side said "close".
        if self._closed or not connection.is_idle() or len(stack) >= self._max_idle:
            await self._close(connection)
            if not stack:
                del self._idle[key]
            return
        stack.append((connection, self._clock()))

    async def _discard(self, connection: httpcore.AsyncHTTP11Connection) -> None:
        self._busy.discard(connection)
        await self._close(connection)

    @staticmethod
    async def _close(connection: httpcore.AsyncHTTP11Connection) -> None:
        with anyio.CancelScope(shield=True):
            await connection.aclose()

    async def _sweep(self, now: float) -> None:
        """Close the connections idle longer than the keep-alive, of every origin (no syscall per
        connection: only its idle time is looked at)."""
        self._next_sweep = now + self._expiry_s
        for key in list(self._idle):
            stack = self._idle[key]
            fresh = [(c, since) for c, since in stack if now - since < self._expiry_s]
            for connection, since in stack:
                if now - since >= self._expiry_s:
                    await self._close(connection)
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]


class _Body(httpx.AsyncByteStream):
    """An answer's body; once closed, its connection goes back to the transport (or is closed)."""

    def __init__(self, stream: Any, give_back: Callable[[], Awaitable[None]]) -> None:
        self._stream = stream
        self._give_back = give_back
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except Exception as exc:
            _reraise(exc)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.aclose()
        except Exception as exc:
            _reraise(exc)
        finally:
            with anyio.CancelScope(shield=True):
                await self._give_back()


class _NoCookieJar(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing and sends nothing."""

    def extract_cookies(self, response: Any, request: urllib.request.Request) -> None:
        return None

    def add_cookie_header(self, request: urllib.request.Request) -> None:
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


class _NoCookies(httpx.Cookies):
    """Cookies never kept, never sent, and not even looked for in an answer.

    A receiver's Set-Cookie must not ride along to the next delivery, least of all to another
    receiver (spec URLs are chosen by whoever drops a file); and a webhook has no session.
    A jar that keeps nothing still had httpx wrap every answer and its request for it.
    """

    def __init__(self) -> None:
        super().__init__(_NoCookieJar())

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class WebhookClient(httpx.AsyncClient):
    """httpx's client, without cookies (see _NoCookies)."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("the webhook client keeps no cookies")


def webhook_client() -> httpx.AsyncClient:
    """The client deliveries go out on: HTTP/1.1 keep-alive connections (KeepAliveTransport), no
    redirects followed, no cookies kept.

    Like `providers.http.http_client`, loopback goes past any proxy named in the environment;
    other URLs honour it (through httpx's own transports).
    """
    context = tls_context()
    transport = KeepAliveTransport(ssl_context=context)
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {
        f"all://{host}": transport for host in ("127.0.0.1", "localhost", "[::1]")
    }
    return WebhookClient(transport=transport, mounts=mounts, verify=context, follow_redirects=False)
