"""Issue #13, classes 6 and 7, against the real `batchd run`: input no encoder can write back, and
webhook URLs that try to leave the allow-list or carry credentials.

Each test shows the daemon still running and taking new work afterwards, nothing written outside
its folders (its temporary folder included), and every request of every file either answered in
the outbox or in a file moved to `rejected/` with a report naming the rule (and the line).
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from batchd.emulator.server import serve_emulator
from tests.acceptance.conftest import (
    SECRET,
    DaemonProcess,
    Harness,
    Workspace,
    chat,
    eventually,
    harness,
    read_jsonl,
)

pytestmark = pytest.mark.each_database


@dataclass
class PathReceiver:
    """A webhook receiver for specs' URLs that records the path and query of every request."""

    requests: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.requests.append((scope["path"], scope["query_string"].decode()))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def configure(ws: Workspace, *, provider: str = "", inbox: str = "") -> None:
    """Add keys to the [provider] and [inbox] tables of the harness's config."""
    text = ws.config.read_text(encoding="utf-8")
    text = text.replace('kind = "together"\n', f'kind = "together"\n{provider}\n', 1)
    text = text.replace("[inbox]\n", f"[inbox]\n{inbox}\n", 1)
    ws.config.write_text(text, encoding="utf-8")


def start(h: Harness, tmp_path: Path) -> tuple[DaemonProcess, Path]:
    """The daemon, with a temporary folder of its own that must stay empty."""
    scratch = tmp_path / "daemon-tmp"
    scratch.mkdir()
    return h.start(env={"TMPDIR": str(scratch)}), scratch


def written_outside(ws: Workspace, scratch: Path) -> list[Path]:
    """Files the daemon wrote outside its state folder (inbox and outbox live inside it)."""
    ours = {ws.config, *ws.root.glob("daemon-*.log")}
    outside = [p for p in ws.root.rglob("*") if p.is_file() and p not in ours and ws.root / "state" not in p.parents]
    return outside + list(scratch.rglob("*"))


def request_line(request: dict[str, Any]) -> bytes:
    return json.dumps(request).encode() + b"\n"  # ensure_ascii: a lone surrogate stays a \\udXXX escape


def accounted(ws: Workspace, name: str, sent: list[dict[str, Any]]) -> None:
    """Every custom_id of the file once in the outbox, the file complete."""
    folder = ws.outbox / name
    out = [line["custom_id"] for line in read_jsonl(folder / "output.jsonl")]
    err = (
        [line["custom_id"] for line in read_jsonl(folder / "errors.jsonl")]
        if (folder / "errors.jsonl").exists()
        else []
    )
    assert sorted(out + err) == sorted(r["custom_id"] for r in sent)
    assert (folder / "job.json").is_file()


def rejected_with(ws: Workspace, name: str, data: bytes, where: str) -> str:
    """The file moved byte-identical to rejected/, its report naming `where` ("line N: rule")."""
    assert (ws.inbox / "rejected" / name).read_bytes() == data
    report = (ws.inbox / "rejected" / f"{name}.errors.txt").read_text(encoding="utf-8")
    assert where in report, report
    return report


async def test_lines_no_encoder_can_write_back_are_rejected_by_line(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # The per-request limit from the config: 2,000 bytes here, so the huge line stays small on disk.
        configure(h.ws, provider="max_request_bytes = 2000")
        daemon, scratch = start(h, tmp_path)
        await daemon.until_logged("daemon.ready")

        deep: Any = []
        for _ in range(63):
            deep = [deep]  # 64 lists, inside the body (2) inside the request (1): 66 deep
        files = {
            "surrogate.jsonl": [chat("s-1"), chat("s-2\ud800"), chat("s-3")],
            "surrogate-text.jsonl": [chat("t-1"), chat("t-2", "fine \U0001f600 then lone \udc00")],
            "deep.jsonl": [chat("d-1"), {**chat("d-2"), "body": {**chat("d-2")["body"], "deep": deep}}],
            "huge.jsonl": [chat("h-1"), chat("h-2", "x" * 5000), chat("h-3")],
        }
        expected = {
            "surrogate.jsonl": "line 2: lone_surrogate:",
            "surrogate-text.jsonl": "line 2: lone_surrogate:",
            "deep.jsonl": "line 2: too_deep:",
            "huge.jsonl": "line 2: too_large: this line alone is longer than the limit per request (2,000 bytes)",
        }
        dropped = {name: b"".join(request_line(r) for r in lines) for name, lines in files.items()}
        for name, data in dropped.items():
            h.ws.drop(name, data)
        await h.receiver.wait_for(lambda hooks: len(hooks) >= len(files))
        events = {e["data"]["source"]: e for e in h.receiver.verified()}
        assert {source: e["type"] for source, e in events.items()} == dict.fromkeys(files, "batch.rejected")
        for name, data in dropped.items():
            rejected_with(h.ws, name, data, expected[name])
            assert expected[name].split(":")[1].strip() in events[name]["data"]["reason"]

        # Still running, still taking work: a good file dropped afterwards completes.
        good = [chat(f"g-{i}", "\U0001f600 ok") for i in range(3)]
        h.ws.drop("good.jsonl", b"".join(request_line(r) for r in good))
        await h.receiver.wait_for(lambda hooks: len(hooks) >= len(files) + 1)
        assert h.receiver.verified()[-1]["type"] == "batch.completed"
        accounted(h.ws, "good", good)
        assert daemon.proc.poll() is None
        assert written_outside(h.ws, scratch) == []
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=10) == 0


async def test_spec_webhook_urls_that_leave_the_allow_list_are_rejected(tmp_path: Path) -> None:
    spec_receiver = PathReceiver()
    async with harness(tmp_path) as h, serve_emulator(spec_receiver, host="127.0.0.1", port=0) as base:
        configure(h.ws, inbox=f'allow_webhook_urls = ["{base}/hook"]\nwebhook_secret = "{SECRET}"')
        daemon, scratch = start(h, tmp_path)
        await daemon.until_logged("daemon.ready")

        (h.ws.inbox / "data").mkdir(parents=True)
        bad_data = request_line(chat("b-1"))
        (h.ws.inbox / "data" / "bad.jsonl").write_bytes(bad_data)
        tricks = {
            "dots.json": (f"{base}/hook/../admin", "matches no entry"),
            "escaped-dots.json": (f"{base}/hook/%2e%2e/admin", "matches no entry"),
            "slash-dots.json": (f"{base}/hook/..%2Fadmin", "matches no entry"),
            "evil.json": (f"{base}/hookEVIL", "matches no entry"),
            "bell.json": (f"{base}/hook/\u0007x", "control character"),
            "newline.json": (f"{base}/hook/x\ny", "control character"),
            "space.json": (f"{base}/hook/ x", "control character or whitespace"),
        }
        specs = {
            name: json.dumps({"input": "data/bad.jsonl", "webhook_url": url}).encode()
            for name, (url, _) in tricks.items()
        }
        for name, spec in specs.items():
            h.ws.drop(name, spec)
        await h.receiver.wait_for(lambda hooks: len(hooks) >= len(tricks))
        assert [e["type"] for e in h.receiver.verified()] == ["batch.rejected"] * len(tricks)
        for name, (_, why) in tricks.items():
            report = rejected_with(h.ws, name, specs[name], "file: webhook_url: ")
            assert why in report
        # A rejected spec leaves its data file where it was.
        assert (h.ws.inbox / "data" / "bad.jsonl").read_bytes() == bad_data

        # Still taking work: a spec whose URL stays under the entry gets its event there, at
        # the URL it named, token and all (only what is shown hides it).
        good = [chat(f"g-{i}") for i in range(2)]
        (h.ws.inbox / "data" / "good.jsonl").write_bytes(b"".join(request_line(r) for r in good))
        url = f"{base}/hook/./team?token=spec-t0ken-value"
        h.ws.drop("good.json", json.dumps({"input": "data/good.jsonl", "webhook_url": url}).encode())
        await h.receiver.wait_for(lambda hooks: len(hooks) >= len(tricks) + 1)
        assert h.receiver.verified()[-1]["type"] == "batch.completed"
        accounted(h.ws, "good", good)
        # Exactly one request reached the spec receiver: the completed job's, at the normal form.
        await eventually(lambda: bool(spec_receiver.requests), 30)
        assert spec_receiver.requests == [("/hook/team", "token=spec-t0ken-value")]

        shown = await h.ws.batchd("show", "good", "--json")
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        assert record["webhook_url"] == f"{base}/hook/./team?token=***"
        assert "spec-t0ken-value" not in shown.stdout + (await h.ws.batchd("show", "good")).stdout
        assert "spec-t0ken-value" not in (await h.ws.batchd("webhooks")).stdout
        assert "spec-t0ken-value" not in daemon.log_path.read_text(encoding="utf-8")

        assert daemon.proc.poll() is None
        assert written_outside(h.ws, scratch) == []
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=10) == 0


PASSWORD = "hook-pa55word-value"
TOKEN = "t0ken-secret-value"


async def test_credentials_in_a_configured_webhook_url_are_never_shown(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        full = h.receiver.url.replace("http://", f"http://hook-user:{PASSWORD}@") + f"?token={TOKEN}"
        shown = h.receiver.url.replace("http://", "http://***@") + "?token=***"
        text = h.ws.config.read_text(encoding="utf-8").replace(f'url = "{h.receiver.url}"', f'url = "{full}"')
        h.ws.config.write_text(text, encoding="utf-8")
        daemon, scratch = start(h, tmp_path)
        await daemon.until_logged("daemon.ready")

        h.ws.drop("first.jsonl", request_line(chat("f-1")))
        (first,) = await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        assert first.event["type"] == "batch.completed"  # the receiver still gets the event
        event_id = first.headers["webhook-id"]
        outputs: list[str] = []

        async def run(*args: str, code: int = 0) -> str:
            done = await h.ws.batchd(*args)
            assert done.returncode == code, done.stdout + done.stderr
            outputs.append(done.stdout + done.stderr)
            return done.stdout + done.stderr

        rows = json.loads(await run("webhooks", "--json"))
        assert [row["url"] for row in rows] == [shown]
        assert shown in await run("webhooks")
        record = json.loads(await run("show", "first", "--json"))
        assert [w["url"] for w in record["webhooks"]] == [shown]
        assert shown in await run("show", "first")

        # A 410 disables it; the URL as the table shows it, or in full, names it to the commands.
        h.receiver.script = [410]
        assert "queued again" in await run("webhooks", "replay", event_id, "--url", full)
        await daemon.until_logged("webhook.endpoint_gone", timeout=15)
        assert f"{shown}: skipped, the endpoint is disabled" in await run("webhooks", "replay", event_id, code=1)
        assert f"enabled {shown}; 1 parked delivery is due now" in await run("webhooks", "enable", shown)
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 3, timeout=15)
        assert h.receiver.hooks[-1].status == 204 and h.receiver.hooks[-1].headers["webhook-id"] == event_id
        assert "is not disabled" in await run("webhooks", "enable", full, code=1)
        assert f"POST {shown}" in await run("webhooks", "test", full)

        # Still taking work.
        h.ws.drop("second.jsonl", request_line(chat("s-1")))
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 5, timeout=30)
        accounted(h.ws, "second", [chat("s-1")])
        assert daemon.proc.poll() is None
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=10) == 0

        logs = daemon.log_path.read_text(encoding="utf-8")
        assert any(e.get("event") == "webhook.delivered" and e.get("url") == shown for e in daemon.logs())
        leaks = [(PASSWORD in text, TOKEN in text) for text in [logs, *outputs]]
        assert leaks == [(False, False)] * len(leaks)
        assert written_outside(h.ws, scratch) == []


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('[[webhooks]]\nurl = "http://user:{password}@127.0.0.1:9/hooks\\u0007?token={token}"\nsecret = "{secret}"\n',
         "webhooks[0].url"),
        ('[inbox]\nallow_webhook_urls = ["http://127.0.0.1:9/hooks /x?token={token}"]\nwebhook_secret = "{secret}"\n',
         "inbox.allow_webhook_urls[0]"),
    ],
)  # fmt: skip
async def test_a_configured_url_with_a_control_character_stops_start_up(tmp_path: Path, table: str, key: str) -> None:
    async with harness(tmp_path) as h:
        text = h.ws.config.read_text(encoding="utf-8").replace("[inbox]\n", "[old-inbox]\n")
        text = text.split("[old-inbox]")[0] + table.format(password=PASSWORD, token=TOKEN, secret=SECRET)
        h.ws.config.write_text(text, encoding="utf-8")
        result = await h.ws.batchd("run")
        assert result.returncode == 2, result.stdout + result.stderr
        assert key in result.stderr and "control characters or whitespace" in result.stderr
        assert PASSWORD not in result.stderr + result.stdout and TOKEN not in result.stderr + result.stdout
