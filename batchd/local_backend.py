"""The embedded backend (`provider.kind = "local"`): the emulator on a loopback port, behind a token.

Each start makes a new random token, writes it to `<state_dir>/local/token`
(mode 0600, so only the service user can read it: tests and tools that talk
to the backend read it there), registers it with the log redaction, and
creates the emulator with it: every route, the control endpoints included,
then needs `Authorization: Bearer <token>`. Request bodies are capped at
`[local] max_body_bytes`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
import httpx
import structlog

from batchd import logs
from batchd.config import Settings
from batchd.emulator.app import create_app
from batchd.emulator.engines import EchoEngine, Engine, UpstreamEngine
from batchd.emulator.server import serve_emulator
from batchd.models import PROVIDER_LIMITS
from batchd.providers.together import TogetherProvider

log = structlog.get_logger("batchd.local_backend")

#: The token's file name in the backend's data folder (`Settings.local_dir`).
TOKEN_FILE = "token"


def token_path(local_dir: Path) -> Path:
    """Where the running backend's token is."""
    return local_dir / TOKEN_FILE


def write_token(local_dir: Path, token: str) -> None:
    """Put `token` in `local_dir/token`, readable by this user only from the moment it exists.

    It is written to a fresh temp name created 0600 with O_EXCL and then
    renamed over the old token: whatever stood at either name (a symlink
    someone planted, say) is replaced, never followed. `local_dir` itself is
    opened without following a symlink.
    """
    local_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = os.open(local_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        temp = f".{TOKEN_FILE}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, 0o600, dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as stream:
                # The umask may only take bits away; this makes the mode exactly 0600.
                os.fchmod(stream.fileno(), 0o600)
                stream.write(token.encode() + b"\n")
            os.replace(temp, TOKEN_FILE, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)
            raise
    finally:
        os.close(folder)


def read_token(local_dir: Path) -> str:
    """The token of the backend running on `local_dir` (for tests and tools with the service user's rights)."""
    return token_path(local_dir).read_text(encoding="ascii").strip()


def local_engine(settings: Settings, http: httpx.AsyncClient) -> Engine:
    """The engine `[local]` asks for: echo, or an upstream OpenAI-compatible server."""
    if settings.local.engine == "upstream":
        return UpstreamEngine(http, settings.local.upstream_url, settings.local.concurrency)
    return EchoEngine()


@asynccontextmanager
async def open_local_backend(settings: Settings, http: httpx.AsyncClient) -> AsyncIterator[TogetherProvider]:
    """Serve the embedded backend on a loopback port for as long as the block runs; yield its provider."""
    token = secrets.token_urlsafe(32)
    # Registered before anything could log it.
    logs.redact_values([token])
    await anyio.to_thread.run_sync(write_token, settings.local_dir, token)
    app = create_app(
        settings.local_dir,
        engine=local_engine(settings, http),
        api_key=token,
        max_body_bytes=settings.local.max_body_bytes,
    )
    async with serve_emulator(app, host="127.0.0.1", port=0) as url:
        log.info(
            "service.local_backend",
            url=url,
            data_dir=str(settings.local_dir),
            max_body_bytes=settings.local.max_body_bytes,
        )
        yield TogetherProvider(http, base_url=url, api_key=token, kind="local", limits=PROVIDER_LIMITS["local"])
