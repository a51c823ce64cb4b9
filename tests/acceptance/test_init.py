"""The first ten minutes: no config anywhere, `batchd init`, and the tour it prints, as a user runs it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from standardwebhooks.webhooks import Webhook

from batchd.config import DEFAULT_CONFIG_PATH, load_settings
from batchd.config.settings import DEFAULT_KEY_ENVS, PROVIDER_KINDS
from batchd.emulator.server import serve_emulator
from batchd.validation import validate_file
from tests.acceptance.conftest import Receiver, read_jsonl


def batchd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    return subprocess.run(
        [sys.executable, "-m", "batchd", *args], env={**base, **(env or {})}, cwd=cwd, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.skipif(DEFAULT_CONFIG_PATH.exists(), reason=f"this machine has a {DEFAULT_CONFIG_PATH}")
@pytest.mark.parametrize("command", [["run"], ["run", "--once"], ["jobs"], ["show", "x"], ["submit", "f.jsonl"]])
def test_no_config_anywhere_exits_2_with_one_line_and_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "f.jsonl").write_text("", encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))
    result = batchd(*command, cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert str(DEFAULT_CONFIG_PATH) in line and "$BATCHD_CONFIG" in line and "batchd init" in line
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_init_writes_a_config_that_loads_folders_and_a_private_secret(tmp_path: Path) -> None:
    home = tmp_path / "batchd"
    result = batchd("init", str(home), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    settings = load_settings(home / "batchd.toml", environ={})
    assert settings.provider.kind == "local"
    assert (settings.state_dir, settings.inbox_dir, settings.outbox_dir) == (
        home / "state", home / "inbox", home / "outbox",
    )  # fmt: skip
    assert all(p.is_dir() for p in (settings.state_dir, settings.inbox_dir, settings.outbox_dir))
    secret_file = home / "webhook-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text(encoding="utf-8").strip()
    assert secret.startswith("whsec_") and [s.reveal() for s in settings.inbox.webhook_secrets] == [secret]
    config_text = (home / "batchd.toml").read_text(encoding="utf-8")
    assert "# [[webhooks]]" in config_text and 'secret_file = "webhook-secret"' in config_text
    # The three next commands, each naming this config.
    out = result.stdout
    assert f"--config {home / 'batchd.toml'} run" in out and "submit" in out and "outbox/example/output.jsonl" in out
    assert "together" in out  # how to switch to a real provider


def test_init_never_replaces_a_config_and_keeps_an_existing_secret(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "webhook-secret").write_text("whsec_bXlvd24tc2VjcmV0LW9mLTMyLWJ5dGVzLXh4eHh4eA==\n", encoding="utf-8")
    first = batchd("init", str(home), cwd=tmp_path)
    assert first.returncode == 0 and "kept" in first.stdout
    assert (home / "webhook-secret").read_text().startswith("whsec_bXlvd24t")
    mine = "# my own config\n"
    (home / "batchd.toml").write_text(mine, encoding="utf-8")
    again = batchd("init", str(home), cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert (home / "batchd.toml").read_text(encoding="utf-8") == mine
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(".")) == []  # no temporaries left


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
def test_init_pre_fills_each_provider_with_an_example_its_rules_accept(tmp_path: Path, kind: str) -> None:
    home = tmp_path / kind
    result = batchd("init", "--provider", kind, str(home), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    environ = {DEFAULT_KEY_ENVS[kind]: "k"} if kind in DEFAULT_KEY_ENVS else {}
    settings = load_settings(home / "batchd.toml", environ=environ)
    assert settings.provider.kind == kind
    if kind in DEFAULT_KEY_ENVS:
        assert DEFAULT_KEY_ENVS[kind] in result.stdout  # where the key goes
    report = validate_file(
        home / "example.jsonl", source="example.jsonl", limits=settings.provider.validation_limits, dialect=kind
    )
    assert report.ok and report.request_count == 2, report.problems


async def test_fresh_init_runs_a_file_and_a_spec_and_its_secret_verifies(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert batchd("init", str(home), cwd=tmp_path).returncode == 0
    secret = (home / "webhook-secret").read_text(encoding="utf-8").strip()
    receiver = Receiver()
    async with serve_emulator(receiver, host="127.0.0.1", port=0) as hook_url:
        # What the generated config asks the user to do: uncomment the block, set the URL.
        config = home / "batchd.toml"
        text = config.read_text(encoding="utf-8").replace("# [[webhooks]]\n# url = ", "[[webhooks]]\nurl = ")
        text = text.replace('"https://hooks.example.com/batchd"\n# secret_file', f'"{hook_url}/hook"\nsecret_file')
        config.write_text(text, encoding="utf-8")
        cfg = ["--config", str(config), "--set", 'metrics.listen=""']
        submitted = batchd(*cfg, "submit", str(home / "example.jsonl"), cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        assert "no batchd daemon runs" in submitted.stdout  # none started yet: said, not silent
        (home / "spec" / "data").mkdir(parents=True)
        (home / "spec" / "data" / "questions.jsonl").write_bytes((home / "example.jsonl").read_bytes())
        (home / "spec" / "questions.json").write_text(
            json.dumps({"input": "data/questions.jsonl", "metadata": {"team": "tour"}}), encoding="utf-8"
        )
        assert batchd(*cfg, "validate", str(home / "spec" / "questions.json"), cwd=tmp_path).returncode == 0
        assert batchd(*cfg, "submit", str(home / "spec" / "questions.json"), cwd=tmp_path).returncode == 0
        with anyio.fail_after(120):
            done = await anyio.to_thread.run_sync(
                lambda: batchd(*cfg, "run", "--once", "--timeout", "90", cwd=tmp_path)
            )
        assert done.returncode == 0, done.stdout + done.stderr
    for name in ("example", "questions"):
        meta = json.loads((home / "outbox" / name / "job.json").read_text(encoding="utf-8"))
        assert meta["status"] == "completed" and meta["request_counts"]["completed"] == 2
        assert [line["custom_id"] for line in read_jsonl(home / "outbox" / name / "output.jsonl")] == [
            "hello-1", "hello-2",
        ]  # fmt: skip
    assert meta["metadata"] == {"team": "tour"}
    events = [Webhook(secret).verify(hook.body, hook.headers) for hook in receiver.hooks]
    assert sorted(e["data"]["name"] for e in events) == ["example", "questions"]
    assert {e["type"] for e in events} == {"batch.completed"}


def test_run_once_timeout_says_what_it_was_still_waiting_for(tmp_path: Path) -> None:
    config = tmp_path / "batchd.toml"
    # A provider nobody answers for: the job cannot get past its upload.
    config.write_text(
        'state_dir = "state"\n[provider]\nkind = "together"\nbase_url = "http://127.0.0.1:9"\n', encoding="utf-8"
    )
    (tmp_path / "state" / "inbox").mkdir(parents=True)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    (tmp_path / "state" / "inbox" / "stuck.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    result = batchd(
        "--config", str(config), "run", "--once", "--timeout", "3", cwd=tmp_path, env={"TOGETHER_API_KEY": "k"}
    )
    assert result.returncode == 1
    (said,) = [line for line in result.stderr.splitlines() if line.startswith("batchd:")]
    assert "--timeout 3 s passed" in said and "1 job not finished (1 " in said
