"""The webhook transport's connections send a request in one piece (transport._CoalescingStream)."""

from __future__ import annotations

from typing import Any

import httpcore

from batchd.webhooks.transport import COALESCE_BYTES, _CoalescingStream


class RecordingStream(httpcore.AsyncNetworkStream):
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, float | None]] = []
        self.closed = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return b"answer"

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.sent.append((buffer, timeout))

    async def aclose(self) -> None:
        self.closed = True

    def get_extra_info(self, info: str) -> Any:
        return f"info:{info}"


async def test_what_is_written_goes_out_in_one_send_before_the_next_read() -> None:
    inner = RecordingStream()
    stream = _CoalescingStream(inner)
    await stream.write(b"POST /hook HTTP/1.1\r\n\r\n", timeout=3.0)
    await stream.write(b"")
    await stream.write(b'{"id": 1}', timeout=3.0)
    assert inner.sent == []
    assert await stream.read(100) == b"answer"
    assert inner.sent == [(b'POST /hook HTTP/1.1\r\n\r\n{"id": 1}', 3.0)]
    assert await stream.read(100) == b"answer"
    assert len(inner.sent) == 1
    assert stream.get_extra_info("is_readable") == "info:is_readable"


async def test_a_large_body_goes_out_in_pieces_and_a_close_drops_what_is_held() -> None:
    inner = RecordingStream()
    stream = _CoalescingStream(inner)
    await stream.write(b"head")
    await stream.write(b"x" * COALESCE_BYTES)
    assert [len(data) for data, _ in inner.sent] == [4 + COALESCE_BYTES]
    await stream.write(b"tail")
    await stream.aclose()
    assert inner.closed and len(inner.sent) == 1
