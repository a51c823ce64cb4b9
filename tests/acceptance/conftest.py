"""What acceptance tests share: the emulator as a Together server on loopback, a
webhook receiver, and the real `batchd run` as a subprocess with real folders."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from standardwebhooks.webhooks import Webhook
from starlette.types import Receive, Scope, Send

from batchd.emulator.app import create_app
from batchd.emulator.engines import Engine
from batchd.emulator.server import serve_emulator
from tests.databases import database_url

SECRET = "whsec_" + base64.b64encode(b"acceptance-tests-secret-key-32by").decode()
READY_TIMEOUT_S = 30.0


async def eventually(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Wait for something another process does (a log line, an exit): there is no event to await."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the other side is a separate process
            await anyio.sleep(0.05)


@dataclass
class Hook:
    headers: dict[str, str]
    body: bytes
    #: what the reference verifier said on arrival (a receiver checks then: timestamps age)
    verdict: dict[str, Any] | Exception | None = None
    #: the status the receiver answered with
    status: int = 0

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """An ASGI webhook receiver that records every request and wakes waiters."""

    url: str = ""
    hooks: list[Hook] = field(default_factory=list)
    #: answer this many requests with 503 before accepting any
    refuse: int = 0
    #: answer each event's first this many attempts with 503 (counted per webhook-id)
    refuse_each: int = 0
    #: statuses to answer with, in order, before the rules above apply
    script: list[int] = field(default_factory=list)
    #: the status and body of an accepting answer
    ok_status: int = 204
    answer_body: bytes = b""
    #: called with each request before it is answered (e.g. to kill the daemon mid-attempt)
    on_request: Callable[[Hook], None] | None = None
    _changed: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the sender went away before its body arrived: nothing was received
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        try:
            verdict: dict[str, Any] | Exception = Webhook(SECRET).verify(body, headers)
        except Exception as exc:
            verdict = exc
        hook = Hook(headers, body, verdict)
        self.hooks.append(hook)
        if self.on_request is not None:
            self.on_request(hook)
        seen = sum(1 for h in self.hooks if h.headers.get("webhook-id") == headers.get("webhook-id"))
        if self.script:
            hook.status = self.script.pop(0)
        elif len(self.hooks) <= self.refuse or seen <= self.refuse_each:
            hook.status = 503
        else:
            hook.status = self.ok_status
        self._changed.set()
        self._changed = anyio.Event()
        answer = self.answer_body if hook.status != 204 else b""
        await send({"type": "http.response.start", "status": hook.status, "headers": []})
        await send({"type": "http.response.body", "body": answer})

    async def wait_for(self, predicate: Callable[[list[Hook]], bool], timeout: float = 60) -> list[Hook]:
        with anyio.fail_after(timeout):
            while not predicate(self.hooks):
                await self._changed.wait()
        return self.hooks

    def verified(self) -> list[dict[str, Any]]:
        """Every event, each as the reference Standard Webhooks verifier accepted it on arrival."""
        events = []
        for hook in self.hooks:
            if not isinstance(hook.verdict, dict):
                raise AssertionError(f"webhook {hook.headers.get('webhook-id')} failed verification: {hook.verdict}")
            events.append(hook.verdict)
        return events


@dataclass
class Emulator:
    url: str
    http: httpx.AsyncClient
    #: the bearer token every route needs (a daemon's local backend: see `local_backend`)
    token: str | None = None

    async def control(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.token is not None:
            kwargs["headers"] = {"Authorization": f"Bearer {self.token}", **kwargs.get("headers", {})}
        response = await self.http.request(method, f"{self.url}/_emulator/{path}", **kwargs)
        response.raise_for_status()
        return response.json()

    async def creates(self) -> list[dict[str, Any]]:
        stats = await self.control("GET", "stats")
        creates: list[dict[str, Any]] = stats["batch_creates"]
        return creates


@dataclass
class Workspace:
    root: Path
    config: Path
    env: dict[str, str]
    #: the config's database_url: state/batchd.db, or this test's PostgreSQL database
    database_url: str

    @property
    def inbox(self) -> Path:
        return self.root / "state" / "inbox"

    @property
    def outbox(self) -> Path:
        return self.root / "state" / "outbox"

    def drop(self, name: str, lines: list[dict[str, Any]] | bytes) -> Path:
        """Write under an ignored name, then rename into the inbox (the producer protocol)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        data = lines if isinstance(lines, bytes) else "".join(json.dumps(x) + "\n" for x in lines).encode()
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_bytes(data)
        target = self.inbox / name
        os.rename(tmp, target)
        return target

    async def batchd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a batchd command without blocking the event loop (the emulator lives in it)."""
        with anyio.fail_after(timeout):
            done = await anyio.run_process(
                [sys.executable, "-m", "batchd", "--config", str(self.config), *args], env=self.env, check=False
            )
        return subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        )


def make_workspace(tmp_path: Path, emulator_url: str, hook_url: str) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    config = root / "batchd.toml"
    url = database_url(root / "state" / "batchd.db")
    config.write_text(
        f"""
state_dir = "state"
database_url = "{url}"

[provider]
kind = "together"
base_url = "{emulator_url}"

[inbox]
settle_s = 0.2
rescan_s = 1.0

[polling]
min_interval_s = 0.2
max_interval_s = 1.0

[delivery]
timeout_s = 5.0
retry_delays_s = [0.2, 0.5, 1.0]

[[webhooks]]
url = "{hook_url}"
secret = "{SECRET}"
""",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    env["TOGETHER_API_KEY"] = "acceptance-key"
    return Workspace(root, config, env, url)


class DaemonProcess:
    """`python -m batchd run` as a subprocess, its JSON logs in a file."""

    def __init__(self, ws: Workspace, *extra: str, env: dict[str, str] | None = None) -> None:
        self.log_path = ws.root / f"daemon-{len(list(ws.root.glob('daemon-*.log')))}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchd", "--config", str(ws.config), "run", *extra],
            env={**ws.env, **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def logs(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found

    def dead_or_ready(self) -> bool:
        return self.proc.poll() is not None or self.has_logged("daemon.ready")

    def logs_named(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs() if entry.get("event") == event]

    def has_logged(self, event: str) -> bool:
        return any(entry.get("event") == event for entry in self.logs())

    async def until_logged(self, event: str, timeout: float = READY_TIMEOUT_S) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log_path.read_text()}")
            return self.has_logged(event)

        await eventually(seen, timeout)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 10.0) -> int:
        await eventually(lambda: self.proc.poll() is not None, timeout)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def local_backend(ws: Workspace, daemon: DaemonProcess, http: httpx.AsyncClient) -> Emulator:
    """A running daemon's local backend (provider.kind = "local"): the URL it logged, the token it
    wrote to the state directory for this start."""
    (event,) = daemon.logs_named("service.local_backend")
    token = (ws.root / "state" / "local" / "token").read_text(encoding="ascii").strip()
    return Emulator(event["url"], http, token)


@dataclass
class Harness:
    ws: Workspace
    emulator: Emulator
    receiver: Receiver
    daemons: list[DaemonProcess]

    def start(self, *extra: str, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.ws, *extra, env=env)
        self.daemons.append(daemon)
        return daemon


@asynccontextmanager
async def harness(tmp_path: Path, *, engine: Engine | None = None) -> AsyncIterator[Harness]:
    """The emulator as a Together server, a webhook receiver, a workspace; daemons killed at the end.

    A context manager rather than fixtures: the servers' task groups must be entered and left
    in the test's own task. `engine` answers the emulator's requests (default: echo).
    """
    receiver = Receiver()
    async with (
        serve_emulator(create_app(tmp_path / "emulator", engine=engine), host="127.0.0.1", port=0) as url,
        serve_emulator(receiver, host="127.0.0.1", port=0) as hook_url,
        httpx.AsyncClient() as http,
    ):
        receiver.url = hook_url + "/hooks"
        h = Harness(make_workspace(tmp_path, url, receiver.url), Emulator(url, http), receiver, [])
        try:
            yield h
        finally:
            for daemon in h.daemons:
                daemon.kill()


def chat(custom_id: str, text: str = "hello", trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": text}]}
    if trigger:
        body["batchd_emulator"] = trigger
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def message(custom_id: str, text: str = "hello", trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    """An Anthropic request line (`{"custom_id", "params"}`)."""
    params: dict[str, Any] = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    if trigger:
        params["batchd_emulator"] = trigger
    return {"custom_id": custom_id, "params": params}


def gemini(key: str, text: str = "hello", trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Gemini batch line (`{"key", "request"}`; the model is the provider's or the spec's)."""
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if trigger:
        request["batchd_emulator"] = trigger
    return {"key": key, "request": request}


def use_anthropic(h: Harness) -> None:
    """Point the harness's daemon at the emulator's Anthropic dialect."""
    config = h.ws.config.read_text().replace('kind = "together"', 'kind = "anthropic"')
    h.ws.config.write_text(config.replace(f'base_url = "{h.emulator.url}"', f'base_url = "{h.emulator.url}/anthropic"'))
    h.ws.env["ANTHROPIC_API_KEY"] = "acceptance-key"


def use_openai(h: Harness) -> None:
    """Point the harness's daemon at the emulator's OpenAI dialect."""
    config = h.ws.config.read_text().replace('kind = "together"', 'kind = "openai"')
    h.ws.config.write_text(config.replace(f'base_url = "{h.emulator.url}"', f'base_url = "{h.emulator.url}/openai/v1"'))
    h.ws.env["OPENAI_API_KEY"] = "acceptance-key"


def use_gemini(h: Harness, model: str = "gemini-2.5-flash") -> None:
    """Point the harness's daemon at the emulator's Gemini dialect, with a model for its batches."""
    config = h.ws.config.read_text().replace('kind = "together"', f'kind = "gemini"\nmodel = "{model}"')
    h.ws.config.write_text(config.replace(f'base_url = "{h.emulator.url}"', f'base_url = "{h.emulator.url}/gemini"'))
    h.ws.env["GEMINI_API_KEY"] = "acceptance-key"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
