"""The daemon in-process against the emulator over loopback, for integration tests: a real
Store (SQLite or PostgreSQL, see tests.databases), real HTTP, real folders."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from batchd.backoff import RetryPolicy
from batchd.config import Settings, load_settings
from batchd.daemon import Daemon
from batchd.emulator.app import create_app
from batchd.emulator.server import serve_emulator
from batchd.models import Job, RemoteBatch
from batchd.providers.anthropic import AnthropicProvider
from batchd.providers.base import Provider
from batchd.providers.gemini import GeminiProvider
from batchd.providers.openai import OpenAIProvider
from batchd.providers.together import TogetherProvider
from batchd.store import Store
from tests.databases import database_url


def message(custom_id: str, trigger: dict[str, Any] | None = None, text: str | None = None) -> dict[str, Any]:
    """An Anthropic request line (`{"custom_id", "params"}`)."""
    params: dict[str, Any] = {
        "model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": text or custom_id}],
    }  # fmt: skip
    if trigger:
        params["batchd_emulator"] = trigger
    return {"custom_id": custom_id, "params": params}


def gemini(key: str, trigger: dict[str, Any] | None = None, text: str | None = None) -> dict[str, Any]:
    """A Gemini batch line (`{"key", "request"}`): no model, the create call names it."""
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text or key}]}]}
    if trigger:
        request["batchd_emulator"] = trigger
    return {"key": key, "request": request}


def chat(custom_id: str, trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": custom_id}]}
    if trigger:
        body["batchd_emulator"] = trigger
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def eventually(predicate: Callable[[], bool], timeout: float = 20) -> None:
    """Wait for the daemon's background tasks to reach a state."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the daemon offers no event per job state
            await anyio.sleep(0.02)


@dataclass
class Rig:
    settings: Settings
    store: Store
    daemon: Daemon
    provider: Provider
    url: str
    http: httpx.AsyncClient

    def drop(self, name: str, lines: list[dict[str, Any]]) -> None:
        """Write under an ignored name, then rename into the inbox (the producer protocol)."""
        inbox = self.settings.inbox_dir
        inbox.mkdir(parents=True, exist_ok=True)
        tmp = inbox / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        tmp.rename(inbox / name)

    async def control(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, f"{self.url}/_emulator/{path}", **kwargs)
        response.raise_for_status()
        return response.json()

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await self.control("GET", "stats")
        return stats

    async def drain(self, timeout: float = 30) -> None:
        result = await self.daemon.run(once=True, timeout=timeout)
        assert result.drained

    def hold_up_listing(self) -> tuple[anyio.Event, anyio.Event]:
        """The provider's list calls wait, once under way, until `release` is set: (listed, release)."""
        listing = self.provider.list_batches
        listed, release = anyio.Event(), anyio.Event()

        async def held_up(**options: Any) -> list[RemoteBatch]:
            listed.set()
            await release.wait()
            return await listing(**options)

        self.provider.list_batches = held_up  # type: ignore[method-assign]
        return listed, release

    def job(self, name: str) -> Job:
        (job,) = [j for j in self.store.jobs.select() if j.name == name]
        return job

    def outbox_lines(self, name: str, file: str) -> list[dict[str, Any]]:
        path = self.settings.outbox_dir / name / file
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def job_json(self, name: str) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads((self.settings.outbox_dir / name / "job.json").read_text())
        return parsed


@asynccontextmanager
async def rig(
    tmp_path: Path,
    *,
    kind: str = "together",
    emulator: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    provider_lines: str = "",
    polling: tuple[float, float] = (0.02, 0.1),
    config_lines: str = "",
    inbox_lines: str = "",
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Rig]:
    """A daemon on the `kind` dialect of an emulator made with `emulator` options (and
    `provider_lines` added to its [provider] table, `polling` its [polling] intervals,
    `config_lines` more tables at the end of its config, `inbox_lines` more keys of its [inbox];
    `clock` the daemon's and the store's).

    By default one attempt per provider call: the daemon's own step backoff is what most
    of these tests watch.
    """
    config = tmp_path / "batchd.toml"
    config.write_text(
        f'state_dir = "state"\ndatabase_url = "{database_url(tmp_path / "state" / "batchd.db")}"\n'
        f'[provider]\nkind = "{kind}"\nbase_url = "http://127.0.0.1:1"\n{provider_lines}'
        f"[polling]\nmin_interval_s = {polling[0]}\nmax_interval_s = {polling[1]}\n[inbox]\nsettle_s = 0.0\n"
        + inbox_lines
        + config_lines,
        encoding="utf-8",
    )
    keys = ("TOGETHER_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")
    settings = load_settings(config, environ=dict.fromkeys(keys, "k"))
    store = Store(settings.database_url, clock=clock) if clock is not None else Store(settings.database_url)
    store.migrate()
    options: dict[str, Any] = {"retry": retry or RetryPolicy(attempts=1)}
    if sleep is not None:
        options["sleep"] = sleep
    try:
        async with (
            serve_emulator(create_app(tmp_path / "emulator", **(emulator or {})), host="127.0.0.1", port=0) as url,
            httpx.AsyncClient(trust_env=False) as http,
        ):
            provider: Provider
            if kind == "openai":
                provider = OpenAIProvider(http, base_url=f"{url}/openai/v1", api_key="k", **options)
            elif kind == "anthropic":
                provider = AnthropicProvider(http, base_url=f"{url}/anthropic", api_key="k", **options)
            elif kind == "gemini":
                provider = GeminiProvider(http, base_url=f"{url}/gemini", api_key="k", **options)
            else:
                provider = TogetherProvider(http, base_url=url, api_key="k", **options)
            extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
            daemon = Daemon(settings, store=store, provider=provider, **extra)
            yield Rig(settings, store, daemon, provider, url, http)
    finally:
        store.close()
