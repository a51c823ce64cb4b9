"""`batchd demo`: the whole pipeline on the local backend, in a temporary workspace.

It runs the real daemon (the same `serve()` as `batchd run`), drops a sample
file the way a producer should (write under an ignored name, then rename), shows
the job moving, then prints the results and the webhook it received, with the
signature checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import click
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from batchd import logs
from batchd.asgi_server import serve_app
from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.models import JobState
from batchd.service import serve
from batchd.text import counted
from batchd.webhooks import new_secret, verify

QUESTIONS = [
    "What is a batch API?",
    "Why are batch calls half the price?",
    "Name three uses of text embeddings.",
    "What does a webhook signature prove?",
    "How do you survive a power cut mid-job?",
]


class Receiver:
    """A webhook receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.arrived = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        self.received.append((dict(request.headers), body))
        self.arrived.set()
        await Response(status_code=204)(scope, receive, send)


def _sample(path: Path) -> None:
    lines = [
        {
            "custom_id": f"question-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "meta-llama/Llama-3.2-3B-Instruct-Turbo",
                "messages": [{"role": "user", "content": q}],
                "max_tokens": 64,
            },
        }
        for i, q in enumerate(QUESTIONS, 1)
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    os.rename(tmp, path)


def run_demo(keep: Path | None = None) -> int:
    workspace = keep or Path(tempfile.mkdtemp(prefix="batchd-demo-"))
    workspace.mkdir(parents=True, exist_ok=True)
    try:
        return anyio.run(_demo, workspace, keep is not None)
    finally:
        if keep is None:
            # Our own temporary workspace, not a user's file.
            shutil.rmtree(workspace, ignore_errors=True)


async def _demo(workspace: Path, kept: bool) -> int:
    echo = click.echo
    logs.configure(level="error")
    secret = new_secret()
    receiver = Receiver()
    async with serve_app(receiver, host="127.0.0.1", port=0) as hook_url:
        config = workspace / "batchd.toml"
        config.write_text(
            f'state_dir = "state"\n\n[polling]\nmin_interval_s = 0.2\nmax_interval_s = 1.0\n\n'
            f'[[webhooks]]\nurl = "{hook_url}/hooks"\nsecret = "{secret}"\n',
            encoding="utf-8",
        )
        settings = load_settings(config, environ={})
        if kept:
            echo(f"workspace   {workspace}  (kept: its inbox, outbox and config stay there)")
        else:
            # Its paths are not shown: they are gone when the demo ends (`--keep DIR` keeps one).
            echo("workspace   a temporary folder, removed at the end (batchd demo --keep DIR keeps one)")
        echo("")
        daemons: list[Daemon] = []
        async with anyio.create_task_group() as tg:
            started_event = anyio.Event()

            def on_daemon(daemon: Daemon) -> None:
                daemons.append(daemon)
                started_event.set()

            tg.start_soon(lambda: serve(settings, on_daemon=on_daemon))
            with anyio.fail_after(30):
                await started_event.wait()
                await daemons[0].ready.wait()
            drop = settings.inbox_dir / "questions.jsonl"
            _sample(drop)
            echo(f"dropped     {drop.name} ({len(QUESTIONS)} chat requests)")
            started = time.monotonic()
            seen: str | None = None
            with anyio.fail_after(45):
                while True:
                    jobs = daemons[0].store.jobs.select()
                    if jobs:
                        job = jobs[0]
                        if job.state.value != seen:
                            seen = job.state.value
                            echo(f"  {time.monotonic() - started:5.2f}s  {job.short_id}  {seen}")
                        if job.state.terminal and receiver.received:
                            break
                    await anyio.sleep(0.05)
            daemons[0].stop()
        return _report(job.state, Path(job.outbox_path or ""), receiver, secret, echo)


def _report(state: JobState, folder: Path, receiver: Receiver, secret: str, echo: Any) -> int:
    echo("")
    meta = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    counts, usage = meta["request_counts"], meta["usage"]
    echo(f"results     outbox/{folder.name}/  (output.jsonl, job.json)")
    echo(
        f"  status    {meta['status']}: {counted(counts['total'], 'request')}, {counts['completed']:,} completed, "
        f"{counts['failed']:,} failed; {usage.get('prompt_tokens', 0):,} tokens in, "
        f"{usage.get('completion_tokens', 0):,} out"
    )
    with open(folder / "output.jsonl", encoding="utf-8") as fh:
        first = json.loads(fh.readline())
    reply = first["response"]["body"]["choices"][0]["message"]["content"]
    echo(f"  first     {first['custom_id']}: {reply[:70]}")
    headers, body = receiver.received[0]
    ok = verify([secret], headers, body)
    event = json.loads(body)
    echo("")
    echo(f"webhook     {event['type']}  id {headers['webhook-id']}")
    echo(f"  signature {'verified' if ok else 'NOT VALID'} (Standard Webhooks, HMAC-SHA256)")
    echo("")
    echo("Next: `batchd init DIR` writes a config of your own; docs/providers.md points it at a real provider.")
    return 0 if ok and state == JobState.COMPLETED else 1
