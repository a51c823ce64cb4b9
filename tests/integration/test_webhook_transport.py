"""The webhook client's transport (KeepAliveTransport) against real receivers on loopback.

A receiver written on raw sockets shows what the transport does with connections: which
request came on which connection, a receiver that hangs up, an answer left unread.
"""

from __future__ import annotations

import random
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.tls import TLSListener

from batchd.config import Secret, WebhookEndpoint
from batchd.webhooks import Deliverer
from batchd.webhooks.transport import KeepAliveTransport, webhook_client
from tests.integration.test_webhooks import SECRET_A, harness


@dataclass
class RawReceiver:
    """Answers each request on a connection with `answer`; notes which connection each came on."""

    #: the bytes of every answer; "{n}" is replaced by the request's number on its connection
    answer: bytes = b"HTTP/1.1 204 No Content\r\n\r\n"
    #: close the connection after this many requests on it (0: never)
    close_after: int = 0
    #: (connection number, request head) of every request
    requests: list[tuple[int, bytes]] = field(default_factory=list)
    connections: int = 0

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        number, served, buffer = self.connections, 0, b""
        async with stream:
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        buffer += await stream.receive()
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        0,
                    )
                    while len(buffer) < length:
                        buffer += await stream.receive()
                    buffer = buffer[length:]
                    self.requests.append((number, head))
                    served += 1
                    await stream.send(self.answer.replace(b"{n}", str(served).encode()))
                    if self.close_after and served >= self.close_after:
                        return
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return


@asynccontextmanager
async def raw_receiver(receiver: RawReceiver) -> AsyncIterator[str]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, receiver.handle)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_requests_one_after_another_share_one_connection() -> None:
    receiver = RawReceiver()
    async with raw_receiver(receiver) as url, httpx.AsyncClient(transport=KeepAliveTransport()) as http:
        for _ in range(5):
            assert (await http.post(url + "/hook", content=b"{}")).status_code == 204
    assert [number for number, _ in receiver.requests] == [1] * 5


async def test_requests_at_once_get_a_connection_each_then_reuse_them() -> None:
    receiver = RawReceiver()
    transport = KeepAliveTransport()
    async with raw_receiver(receiver) as url, httpx.AsyncClient(transport=transport) as http:
        for _ in range(3):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(http.post, url + "/hook")
        assert transport.idle_connections == 4
    assert receiver.connections == 4 and len(receiver.requests) == 12


async def test_a_connection_the_receiver_closed_is_not_reused() -> None:
    # Either way of hanging up: "Connection: close" said, or the socket closed after the answer.
    for answer in (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ):
        receiver = RawReceiver(answer=answer, close_after=1)
        async with raw_receiver(receiver) as url, httpx.AsyncClient(transport=KeepAliveTransport()) as http:
            for _ in range(3):
                assert (await http.post(url + "/hook")).status_code in (200, 204)
                await anyio.sleep(0.05)  # the receiver's close reaches us
        assert [number for number, _ in receiver.requests] == [1, 2, 3]


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    receiver = RawReceiver(answer=b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100_000)
    transport = KeepAliveTransport()
    async with raw_receiver(receiver) as url, httpx.AsyncClient(transport=transport) as http:
        for _ in range(2):
            async with http.stream("POST", url + "/hook") as response:
                async for _chunk in response.aiter_raw():
                    break
        assert transport.idle_connections == 0
        assert (await http.post(url + "/hook")).status_code == 200  # read whole: kept
        assert transport.idle_connections == 1
    assert [number for number, _ in receiver.requests] == [1, 2, 3]


async def test_idle_connections_are_closed_after_the_keepalive() -> None:
    receiver = RawReceiver()
    clock = FakeClock()
    transport = KeepAliveTransport(keepalive_expiry_s=5.0, clock=clock)
    async with (
        raw_receiver(receiver) as url,
        raw_receiver(RawReceiver()) as other,
        httpx.AsyncClient(transport=transport) as http,
    ):
        await http.post(url + "/hook")
        await http.post(other + "/hook")
        assert transport.idle_connections == 2
        clock.now += 5.0
        # A request to one origin sweeps the connections every origin left idle too long.
        await http.post(other + "/hook")
        assert transport.idle_connections == 1
        await http.post(url + "/hook")
    assert [number for number, _ in receiver.requests] == [1, 2]


async def test_network_failures_are_httpx_errors() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    async with httpx.AsyncClient(transport=KeepAliveTransport()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://127.0.0.1:{port}/hook")
        silent = RawReceiver(answer=b"")
        async with raw_receiver(silent) as url:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(url + "/hook", timeout=0.2)
            broken = RawReceiver(answer=b"NOT HTTP\r\n\r\n")
            async with raw_receiver(broken) as bad:
                with pytest.raises(httpx.RemoteProtocolError):
                    await http.post(bad + "/hook")
        # Nothing left behind by the failures: a good receiver is served as usual.
        receiver = RawReceiver()
        async with raw_receiver(receiver) as url:
            assert (await http.post(url + "/hook")).status_code == 204


async def test_requests_in_flight_are_bounded() -> None:
    silent = RawReceiver(answer=b"")
    async with (
        raw_receiver(silent) as url,
        httpx.AsyncClient(transport=KeepAliveTransport(max_in_flight=2)) as http,
        anyio.create_task_group() as tg,
    ):
        for _ in range(2):
            tg.start_soon(lambda: http.post(url + "/hook", timeout=httpx.Timeout(1.0)))
        await anyio.sleep(0.2)
        with pytest.raises(httpx.PoolTimeout):
            await http.post(url + "/hook", timeout=httpx.Timeout(5.0, pool=0.1))
        tg.cancel_scope.cancel()


async def test_another_tls_server_name_gets_its_own_connection() -> None:
    receiver = RawReceiver()
    async with raw_receiver(receiver) as url, httpx.AsyncClient(transport=KeepAliveTransport()) as http:
        for name in ("a.example", "b.example", "a.example"):
            await http.post(url + "/hook", extensions={"sni_hostname": name})
    assert [number for number, _ in receiver.requests] == [1, 2, 1]


async def test_the_webhook_client_keeps_no_cookie_and_follows_no_redirect() -> None:
    answer = (
        b"HTTP/1.1 302 Found\r\nset-cookie: session=abc; Path=/\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n"
    )
    receiver = RawReceiver(answer=answer)
    async with raw_receiver(receiver) as url, webhook_client() as http:
        for _ in range(2):
            assert (await http.post(url + "/hook")).status_code == 302
        assert not http.cookies
    heads = [head.lower() for _, head in receiver.requests]
    assert len(heads) == 2 and all(b"\r\ncookie:" not in head for head in heads)
    assert all(head.startswith(b"post /hook ") for head in heads)


async def test_deliveries_through_the_webhook_client_reuse_their_connection(tmp_path: Path) -> None:
    receiver = RawReceiver()
    async with raw_receiver(receiver) as url, harness(tmp_path) as h, webhook_client() as http:
        h.settings = replace(h.settings, webhooks=(WebhookEndpoint(f"{url}/hook", (Secret(SECRET_A),)),))
        h.deliverer = Deliverer(h.store, lambda: h.settings, http, clock=h.clock, rng=random.Random(7))
        for _ in range(3):
            event_id = h.emit()
            await h.round()
            assert h.one(event_id).state == "delivered"
    assert len(receiver.requests) == 3 and receiver.connections == 1


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for hooks.test and its key (made by the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=hooks.test",
         "-addext", "subjectAltName=DNS:hooks.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_is_verified_against_the_server_name_and_its_connection_reused(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    receiver = RawReceiver()
    listener = TLSListener(await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0), server_side)
    port = listener.listener.extra(anyio.abc.SocketAttribute.local_port)
    client_side = ssl.create_default_context(cafile=str(cert))
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, receiver.handle)
        async with httpx.AsyncClient(transport=KeepAliveTransport(ssl_context=client_side)) as http:
            # As a pinned spec URL is called: the address in the URL, the checked name for TLS.
            for _ in range(2):
                response = await http.post(
                    f"https://127.0.0.1:{port}/hook", headers={"host": "hooks.test"},
                    extensions={"sni_hostname": "hooks.test"},
                )  # fmt: skip
                assert response.status_code == 204
            with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
                await http.post(f"https://127.0.0.1:{port}/hook", extensions={"sni_hostname": "other.test"})
        tg.cancel_scope.cancel()
    assert [number for number, _ in receiver.requests] == [1, 1]
    assert all(head.startswith(b"POST /hook ") for _, head in receiver.requests)
