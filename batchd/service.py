"""Putting a daemon together: the state lock, the Store, HTTP clients, the provider.

`serve()` is what `batchd run` (and the demo) call; everything it builds is
closed again on the way out.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import structlog

from batchd import logs
from batchd.config import DEFAULT_PROVIDER, ConfigError, ProviderSettings, Settings
from batchd.config.settings import PROVIDER_KINDS
from batchd.daemon import Daemon, db
from batchd.faults import Faults
from batchd.health import serve_metrics
from batchd.local_backend import open_local_backend
from batchd.providers.anthropic import AnthropicProvider
from batchd.providers.base import Provider
from batchd.providers.gemini import GeminiProvider
from batchd.providers.http import API_TIMEOUT, http_client
from batchd.providers.openai import OpenAIProvider
from batchd.providers.together import TogetherProvider
from batchd.store import Store, safe_url
from batchd.urls import url_secrets
from batchd.webhooks import Deliverer
from batchd.webhooks.transport import webhook_client

log = structlog.get_logger("batchd.service")

#: The daemon's umask, whatever it was started with: nothing it makes is world-readable, and
#: group batchd reads what it should (the outbox, rejection reports). Files that must be
#: private (the database, secrets) get 0600 explicitly; see safe_fs for the other modes.
UMASK = 0o027
#: The state directory, when batchd makes it (systemd's StateDirectoryMode says the same).
STATE_DIR_MODE = 0o750


class LockHeld(Exception):
    """Another batchd process owns this state directory."""


@dataclass
class StateLock:
    path: Path
    fd: int

    def release(self) -> None:
        os.close(self.fd)


def acquire_lock(state_dir: Path) -> StateLock:
    """Hold `state_dir/batchd.lock` for the life of the process (one daemon per state directory)."""
    if not state_dir.is_dir():
        state_dir.mkdir(parents=True, exist_ok=True)
        state_dir.chmod(STATE_DIR_MODE)
    path = state_dir / "batchd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(f"another batchd (pid {holder}) is running on {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(path, fd)


def lock_holder(state_dir: Path) -> str | None:
    """The pid a running daemon wrote into `state_dir/batchd.lock`, or None when no process holds
    the lock. Only looks: creates nothing, and lets go of the lock at once if it got it."""
    try:
        fd = os.open(state_dir / "batchd.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


@asynccontextmanager
async def open_provider(settings: Settings, http: httpx.AsyncClient) -> AsyncIterator[Provider]:
    """The default provider of `settings` ([provider]); for the local backend, the emulator served
    on a loopback port (local_backend.py)."""
    async with open_providers(settings, http) as providers:
        yield providers[DEFAULT_PROVIDER]


@asynccontextmanager
async def open_providers(settings: Settings, http: httpx.AsyncClient) -> AsyncIterator[dict[str, Provider]]:
    """Every configured provider by name ("default": [provider]); the local backend is served once,
    whichever providers are of kind "local"."""
    async with AsyncExitStack() as stack:
        local: Provider | None = None
        providers: dict[str, Provider] = {}
        for name in settings.provider_names:
            config = settings.provider_named(name)
            assert config is not None
            if config.kind == "local":
                if local is None:
                    local = await stack.enter_async_context(open_local_backend(settings, http))
                providers[name] = local
            else:
                providers[name] = _remote_provider(config, http)
        yield providers


def _remote_provider(config: ProviderSettings, http: httpx.AsyncClient) -> Provider:
    assert config.api_key is not None
    api_key = config.api_key.reveal()
    if config.kind == "together":
        return TogetherProvider(http, base_url=config.base_url, api_key=api_key)
    if config.kind == "openai":
        return OpenAIProvider(http, base_url=config.base_url, api_key=api_key)
    if config.kind == "anthropic":
        return AnthropicProvider(http, base_url=config.base_url, api_key=api_key)
    if config.kind == "gemini":
        return GeminiProvider(http, base_url=config.base_url, api_key=api_key)
    known = ", ".join(repr(kind) for kind in PROVIDER_KINDS)
    raise ConfigError(f"provider.kind = {config.kind!r} is not a known provider (use one of {known})")


async def serve(
    settings: Settings,
    *,
    once: bool = False,
    timeout: float | None = None,
    reload: Callable[[], Settings] | None = None,
    on_daemon: Callable[[Daemon], None] | None = None,
) -> int:
    """Run the daemon until stopped (0) or, with `once`, until drained (0) or timed out (1)."""
    os.umask(UMASK)
    logs.redact_values(secret_values(settings))
    if reload is not None:
        reload = _redacting(reload)
    address = settings.metrics.address
    lock = acquire_lock(settings.state_dir)
    store = Store(settings.database_url)
    try:
        previous = await db(store.migrate)
        log.info("service.database", url=safe_url(settings.database_url), schema_from=previous)
        async with (
            http_client(timeout=API_TIMEOUT) as api_http,
            webhook_client() as hook_http,
            open_providers(settings, api_http) as providers,
        ):
            daemon: Daemon | None = None
            daemon_id = uuid.uuid4().hex
            # One picture of what fails, for the daemon's loops and its deliveries alike (/healthz).
            faults = Faults()
            deliverer = Deliverer(
                store, lambda: daemon.settings if daemon else settings, hook_http, owner=daemon_id, faults=faults
            )
            daemon = Daemon(
                settings, store=store, provider=providers[DEFAULT_PROVIDER], providers=providers, deliverer=deliverer,
                reload=reload, daemon_id=daemon_id, faults=faults,
            )  # fmt: skip
            if on_daemon is not None:
                on_daemon(daemon)
            # Listening before READY=1; [metrics] listen is read at start only (a reload keeps it).
            # A provider's webhook makes a job due in the store: this daemon's scheduler hears of it
            # at once (as news: the job may be waiting for the sweep under way).
            wake = functools.partial(daemon.wake, news=True)
            async with serve_metrics(address, daemon.monitor, store, lambda: daemon.settings, wake=wake):
                result = await daemon.run(once=once, timeout=timeout)
                if result.left is not None:
                    # For the person or script that ran `run --once --timeout`: the log line
                    # says it too, but a JSON log on stdout is not where one looks first.
                    print(f"batchd: --timeout {timeout:g} s passed; still waiting for: {result.left}", file=sys.stderr)
    finally:
        await anyio.to_thread.run_sync(store.close)
        lock.release()
    return 0 if (not once or result.drained) else 1


def secret_values(settings: Settings) -> list[str]:
    """Every secret the settings hold: the API key, each webhook secret, and the credentials
    inside configured URLs (what batchd.urls.redact_url hides, for wherever else they appear)."""
    secrets = [*settings.inbox.webhook_secrets, *(s for ep in settings.webhooks for s in ep.secrets)]
    secrets += settings.metrics.tokens
    providers = [p for name in settings.provider_names if (p := settings.provider_named(name)) is not None]
    secrets += [p.api_key for p in providers if p.api_key is not None]
    secrets += [s for p in providers for s in p.webhook_secrets]
    urls = [*(p.base_url for p in providers), settings.local.upstream_url, *(ep.url for ep in settings.webhooks)]
    return [s.reveal() for s in secrets] + [part for url in urls for part in url_secrets(url)]


def _redacting(reload: Callable[[], Settings]) -> Callable[[], Settings]:
    """A reload that registers the new settings' secrets for redaction before anything logs them."""

    def wrapped() -> Settings:
        settings = reload()
        logs.redact_values(secret_values(settings))
        return settings

    return wrapped
