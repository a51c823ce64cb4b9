"""The webhook transport's connections (streams.py) over a stand-in asyncio transport: a request
leaves in one send, what arrives is read from a buffer, flow control both ways."""

from __future__ import annotations

import asyncio
from typing import Any

import httpcore
import pytest

from batchd.webhooks.streams import COALESCE_BYTES, READ_HIGH_WATER, Stream, _Protocol


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closing = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 80), "sockname": ("127.0.0.1", 5000)}.get(name, default)


def connected() -> tuple[RecordingTransport, _Protocol, Stream]:
    transport, protocol = RecordingTransport(), _Protocol()
    protocol.connection_made(transport)
    return transport, protocol, Stream(transport, protocol)


async def test_what_is_written_goes_out_in_one_send_before_the_next_read() -> None:
    transport, protocol, stream = connected()
    await stream.write(b"POST /hook HTTP/1.1\r\n\r\n")
    await stream.write(b"")
    await stream.write(b'{"id": 1}')
    assert transport.sent == []
    protocol.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert await stream.read(100) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert transport.sent == [b'POST /hook HTTP/1.1\r\n\r\n{"id": 1}']


async def test_a_large_body_goes_out_in_pieces_and_a_close_drops_what_is_held() -> None:
    transport, _protocol, stream = connected()
    await stream.write(b"head")
    await stream.write(b"x" * COALESCE_BYTES)
    assert [len(data) for data in transport.sent] == [4 + COALESCE_BYTES]
    await stream.write(b"tail")
    await stream.aclose()
    assert transport.closing and len(transport.sent) == 1


async def test_a_read_waits_for_what_arrives_and_sees_the_end() -> None:
    _transport, protocol, stream = connected()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, protocol.data_received, b"abc")
    assert await stream.read(2) == b"ab"
    assert await stream.read(100) == b"c"
    assert not stream.get_extra_info("is_readable")
    loop.call_later(0.01, protocol.eof_received)
    assert await stream.read(100) == b""
    # An idle connection the receiver hung up on is "readable": the pool does not reuse it.
    assert stream.get_extra_info("is_readable")


async def test_a_lost_connection_is_a_read_error_and_a_silent_one_times_out() -> None:
    _transport, protocol, stream = connected()
    with pytest.raises(httpcore.ReadTimeout):
        await stream.read(100, timeout=0.05)
    protocol.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(httpcore.ReadError, match="reset by peer"):
        await stream.read(100)


async def test_reading_pauses_while_much_is_unread_and_resumes_once_it_is_read() -> None:
    transport, protocol, stream = connected()
    protocol.data_received(b"x" * (READ_HIGH_WATER + 1))
    assert not transport.reading
    await stream.read(READ_HIGH_WATER // 2 + 1)
    assert transport.reading
    assert stream.get_extra_info("server_addr") == ("127.0.0.1", 80)
    assert stream.get_extra_info("client_addr") == ("127.0.0.1", 5000)
