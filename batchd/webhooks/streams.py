"""The webhook transport's connections: httpcore's network interface over asyncio's own transports.

httpcore's AnyIO backend, per exchange: registered the socket with epoll and unregistered it
again around every read (anyio pauses reading between reads), set up a cancel scope and an
exception map for every read and every write, and called getpeername() each time a connection
was checked for having been hung up. Over an asyncio Protocol the socket stays registered,
what arrives waits in a buffer, and "did the receiver hang up?" is a look at that buffer.
Writes are held until the next read, so a request leaves in one send (httpcore writes a
request's head and body apart: two sends, and two wake-ups of the receiver).

Outside an asyncio event loop (trio) httpcore's own AnyIO backend is used.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore

#: Written bytes held back at most (a large body goes out in pieces of about this size).
COALESCE_BYTES = 64 * 1024
#: Bytes from the receiver kept unread before its socket stops being read (flow control).
READ_HIGH_WATER = 256 * 1024
#: Between the addresses of a host, as anyio's connect does (RFC 8305, Happy Eyeballs).
HAPPY_EYEBALLS_DELAY_S = 0.25


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Connections for httpcore over asyncio transports (see the module's doc)."""

    def __init__(self) -> None:
        self._fallback = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return await self._fallback.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            with anyio.fail_after(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol,
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                    happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S,
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection to {host}:{port} within {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        for option in socket_options or ():
            transport.get_extra_info("socket").setsockopt(*option)
        return Stream(transport, protocol)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return await self._fallback.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class _Protocol(asyncio.Protocol):
    """What the receiver sends, buffered as it arrives; whether it hung up, and why."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        #: the receiver sent its end of the stream, or the connection was lost
        self.ended = False
        self.error: Exception | None = None
        self._transport: asyncio.Transport | None = None
        self._arrived: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def attach(self, transport: asyncio.Transport) -> None:
        """Read through `transport` from now on (the TLS one, after start_tls)."""
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and not self._reading_paused and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # the transport closes itself: a half-closed connection is of no use here

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def arrival(self) -> None:
        """Return once something arrived or the connection ended."""
        self._arrived = asyncio.get_running_loop().create_future()
        try:
            await self._arrived
        finally:
            self._arrived = None

    async def writable(self) -> None:
        """Return once the transport's write buffer has room again."""
        if self._writable is not None:
            await asyncio.shield(self._writable)

    def take(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` of what arrived; b"" once the receiver ended the stream."""
        if not self.buffer:
            if self.error is not None:
                raise httpcore.ReadError(str(self.error) or type(self.error).__name__)
            return b""
        if len(self.buffer) <= max_bytes:
            data = bytes(self.buffer)
            self.buffer.clear()
        else:
            data = bytes(self.buffer[:max_bytes])
            del self.buffer[:max_bytes]
        if self._reading_paused and len(self.buffer) <= READ_HIGH_WATER // 2 and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    def _wake(self) -> None:
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)


class Stream(httpcore.AsyncNetworkStream):
    """One connection: reads from its protocol's buffer, writes held until the next read."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._held: list[bytes] = []
        self._size = 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._send_held()
        protocol = self._protocol
        if not protocol.buffer and not protocol.ended:
            try:
                if timeout is None:
                    await protocol.arrival()
                else:
                    with anyio.fail_after(timeout):
                        await protocol.arrival()
            except TimeoutError as exc:
                raise httpcore.ReadTimeout(f"nothing read within {timeout} s") from exc
        return protocol.take(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._held.append(buffer)
        self._size += len(buffer)
        if self._size >= COALESCE_BYTES:
            self._send_held()
            try:
                with anyio.fail_after(timeout):
                    await self._protocol.writable()
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(f"nothing written within {timeout} s") from exc

    async def aclose(self) -> None:
        self._held.clear()  # closed mid-request: what was not sent is not wanted
        self._transport.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        self._send_held()
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(timeout):
                transport = await loop.start_tls(
                    self._transport, self._protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no TLS handshake within {timeout} s") from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        assert transport is not None
        # asyncio hands the protocol to the TLS transport without telling it (no connection_made).
        self._protocol.attach(transport)
        return Stream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Asked of an idle connection: anything that arrived, or an end, means it hung up.
            return bool(self._protocol.buffer) or self._protocol.ended
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        return self._transport.get_extra_info(info)  # "ssl_object", "socket"

    def _send_held(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held = []
        self._size = 0
        if self._transport.is_closing():
            # Lost meanwhile: the read that follows raises why (or finds the end of the stream).
            return
        self._transport.write(data)
