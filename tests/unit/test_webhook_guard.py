"""The SSRF guard's DNS cache (`guard.Resolver`): answers kept for a TTL, verdicts never kept."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from batchd.webhooks.guard import DNS_TTL_S, Refused, Resolver, pinned_target

ALLOW = ["https://hooks.example.com/batchd/"]
URL = "https://hooks.example.com/batchd/a"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDns:
    """Stands in for getaddrinfo: answers from `table`, counting the lookups per host."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []
        monkeypatch.setattr("batchd.webhooks.guard.anyio.getaddrinfo", self.resolve)

    async def resolve(self, host: str, port: int, **_: object) -> list[tuple[Any, ...]]:
        self.lookups.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in self.table[host]]


async def test_a_host_is_resolved_once_until_its_answer_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    dns = FakeDns(monkeypatch, {"hooks.example.com": ["93.184.216.34"]})
    clock = FakeClock()
    resolver = Resolver(clock=clock)
    expected = ("https://93.184.216.34/batchd/a", "hooks.example.com")
    assert await pinned_target(URL, ALLOW, resolver) == expected
    clock.now += DNS_TTL_S - 0.1
    assert await pinned_target(URL + "/b", ALLOW, resolver) == ("https://93.184.216.34/batchd/a/b", "hooks.example.com")
    assert dns.lookups == ["hooks.example.com"]
    # Expired: asked again, and the new answer is the one called.
    dns.table["hooks.example.com"] = ["93.184.216.35"]
    clock.now += 0.1
    assert await pinned_target(URL, ALLOW, resolver) == ("https://93.184.216.35/batchd/a", "hooks.example.com")
    assert dns.lookups == ["hooks.example.com"] * 2


async def test_without_a_resolver_every_call_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    dns = FakeDns(monkeypatch, {"hooks.example.com": ["93.184.216.34"]})
    for _ in range(2):
        await pinned_target(URL, ALLOW)
    assert dns.lookups == ["hooks.example.com"] * 2


async def test_a_kept_answer_is_checked_on_every_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cache keeps addresses, not verdicts: a name that resolved inward is refused each time,
    # and a URL taken off the allow-list is refused at once, whatever the cache holds.
    dns = FakeDns(monkeypatch, {"hooks.example.com": ["10.0.0.5"], "ok.example.com": ["93.184.216.34"]})
    resolver = Resolver(clock=FakeClock())
    for _ in range(2):
        with pytest.raises(Refused, match=r"non-public address 10\.0\.0\.5"):
            await pinned_target(URL, ALLOW, resolver)
    assert dns.lookups == ["hooks.example.com"]
    await pinned_target("https://ok.example.com/a", ["https://ok.example.com/"], resolver)
    with pytest.raises(Refused, match="allow_webhook_urls"):
        await pinned_target("https://ok.example.com/a", ["https://ok.example.com/b/"], resolver)


async def test_a_failed_lookup_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    dns = FakeDns(monkeypatch, {})
    resolver = Resolver(clock=FakeClock())
    with pytest.raises(OSError):
        await pinned_target(URL, ALLOW, resolver)
    dns.table["hooks.example.com"] = ["93.184.216.34"]
    assert await pinned_target(URL, ALLOW, resolver) == ("https://93.184.216.34/batchd/a", "hooks.example.com")
    assert dns.lookups == ["hooks.example.com"] * 2


async def test_the_cache_keeps_a_bounded_number_of_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    dns = FakeDns(monkeypatch, {f"h{i}.example.com": ["93.184.216.34"] for i in range(3)})
    resolver = Resolver(clock=FakeClock(), size=2)
    for host in ("h0", "h1", "h2", "h2", "h1", "h0"):
        assert await resolver.addresses(f"{host}.example.com", 443) == ("93.184.216.34",)
    # h0 made way for h2 (the oldest goes first); h1 and h2 were kept, so h0 is looked up again.
    assert dns.lookups == ["h0.example.com", "h1.example.com", "h2.example.com", "h0.example.com"]
