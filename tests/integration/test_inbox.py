"""The inbox (DESIGN §3) over real folders and a real Store (SQLite and PostgreSQL).

Every rejection is checked the way a user would notice it: the file sits
byte-identical in `inbox/rejected/`, a report beside it names the file, the
line and the rule, the job is `rejected`, a `batch.rejected` event is queued,
and nothing was deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchd.config import Settings, load_settings
from batchd.inbox import Inbox, Kind, classify
from batchd.models import Job, JobState
from batchd.store import NewJob, Store
from batchd.watch import InboxWatcher
from tests.databases import database_url

pytestmark = pytest.mark.each_database

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
HOOK = "https://ops.example.com/batchd"
ALLOWED = "https://hooks.example.com/batchd/"


def request(custom_id: str, model: str = "m-1") -> bytes:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
    }
    return json.dumps(line).encode() + b"\n"


GOOD = request("a") + request("b")


@dataclass
class Env:
    root: Path
    inbox_dir: Path
    settings: Settings
    store: Store
    inbox: Inbox

    def drop(self, name: str, content: bytes) -> Path:
        path = self.inbox_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def take(self, name: str) -> Job:
        job = self.inbox.take(self.inbox_dir / name)
        assert job is not None
        return job


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    config = tmp_path / "batchd.toml"
    config.write_text(
        f"""
state_dir = "state"
inbox_dir = "inbox"

[inbox]
allow_webhook_urls = ["{ALLOWED}"]
webhook_secret = "{SECRET}"

[[webhooks]]
url = "{HOOK}"
secret = "{SECRET}"
events = ["batch.rejected"]
""",
        encoding="utf-8",
    )
    settings = load_settings(config, environ={})
    store = Store(database_url(tmp_path / "batchd.db"), clock=lambda: 1000.0)
    store.migrate()
    inbox = Inbox(lambda: settings, store)
    inbox.ensure_folders()
    yield Env(tmp_path, settings.inbox_dir, settings, store, inbox)
    store.close()


def assert_rejected(env: Env, job: Job, dropped: str, content: bytes, *, as_name: str | None = None) -> str:
    """Everything a user sees of a rejection; returns the report's text."""
    name = as_name or dropped
    assert job.state is JobState.REJECTED
    assert env.store.jobs.get(job.id) == job
    assert not os.path.lexists(env.inbox_dir / dropped)
    moved = env.inbox_dir / "rejected" / name
    assert job.rejected_path == str(moved)
    if moved.is_symlink():
        assert str(moved.readlink()).encode() == content
    else:
        assert moved.read_bytes() == content
    report_path = env.inbox_dir / "rejected" / f"{name}.errors.txt"
    assert job.report_path == str(report_path)
    report = report_path.read_text(encoding="utf-8")
    assert dropped in report
    (delivery,) = env.store.deliveries.select(job_id=job.id)
    assert (delivery.event_type, delivery.url, delivery.state) == ("batch.rejected", HOOK, "pending")
    assert delivery.id in {d.id for d in env.store.deliveries.due(1000.0)}
    data = json.loads(delivery.body)["data"]
    assert data["id"] == job.id
    assert data["status"] == "rejected"
    assert data["source"] == dropped
    assert data["report_file"] == str(report_path)
    assert data["reason"] == job.reason
    # The claim folder is left (holding only batchd's markers); nothing of the user's stays in it or is lost.
    claim = env.inbox_dir / ".batchd" / "claimed" / job.id
    assert [p.name for p in claim.iterdir() if not p.name.startswith(".claimed-")] == []
    return report


def spec(env: Env, name: str, doc: Any, data: bytes | None = GOOD, data_name: str = "data/x.jsonl") -> bytes:
    """Drop a data file (unless None) and a spec; return the spec's bytes."""
    if data is not None:
        env.drop(data_name, data)
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    env.drop(name, raw)
    return raw


# ---------------------------------------------------------------- bad request files


def test_bad_lines_are_reported_by_line_and_rule(env: Env) -> None:
    content = request("a") + b'{"custom_id": "b",\n' + request("c") + request("a")
    env.drop("batch.jsonl", content)
    job = env.take("batch.jsonl")
    report = assert_rejected(env, job, "batch.jsonl", content)
    assert "line 2: json:" in report
    assert "line 4: duplicate_custom_id:" in report
    assert "line 1" in report  # the duplicate names the first use
    assert "line 3" not in report


def test_another_extension_is_rejected(env: Env) -> None:
    content = b"custom_id,prompt\na,hi\n"
    env.drop("x.csv", content)
    report = assert_rejected(env, env.take("x.csv"), "x.csv", content)
    assert "file: extension:" in report


def test_a_taken_rejected_name_gets_the_short_job_id(env: Env) -> None:
    env.drop("x.csv", b"first")
    first = env.take("x.csv")
    env.drop("x.csv", b"second")
    second = env.take("x.csv")
    assert_rejected(env, first, "x.csv", b"first")
    assert_rejected(env, second, "x.csv", b"second", as_name=f"x.{second.id[:8]}.csv")
    assert (env.inbox_dir / "rejected" / "x.csv").read_bytes() == b"first"


def test_a_symlink_is_rejected_and_never_followed(env: Env) -> None:
    target = env.root / "elsewhere" / "real.jsonl"
    target.parent.mkdir()
    target.write_bytes(GOOD)  # a valid file: following the link would accept it
    (env.inbox_dir / "link.jsonl").symlink_to(target)
    assert classify(env.inbox_dir / "link.jsonl") is Kind.BAD
    job = env.take("link.jsonl")
    report = assert_rejected(env, job, "link.jsonl", str(target).encode())
    assert "file: symlink:" in report
    assert (env.inbox_dir / "rejected" / "link.jsonl").is_symlink()
    assert target.read_bytes() == GOOD
    assert list(target.parent.iterdir()) == [target]


def test_an_empty_file_is_rejected(env: Env) -> None:
    env.drop("empty.jsonl", b"")
    report = assert_rejected(env, env.take("empty.jsonl"), "empty.jsonl", b"")
    assert "file: empty:" in report


def test_a_file_named_like_the_upload_copy_is_kept_byte_identical(env: Env) -> None:
    # CRLF and a blank line: the upload copy differs from the user's bytes.
    content = request("a").replace(b"\n", b"\r\n") + b"\r\n" + request("b")
    env.drop("upload.jsonl", content)
    job = env.take("upload.jsonl")
    assert job.state is JobState.RECEIVED
    assert job.claimed_path != job.upload_path
    assert Path(str(job.claimed_path)).read_bytes() == content
    assert Path(str(job.upload_path)).read_bytes() == GOOD


# ---------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b'{"input": "data/x.jsonl",\n  oops}\n', "line 2: json:", id="bad-json"),
        pytest.param(b'["data/x.jsonl"]', "file: spec: a spec must be a JSON object", id="not-an-object"),
        pytest.param(b'{"input": "data/x.jsonl", "modle": "m"}', "file: spec: unknown key(s) modle", id="unknown-key"),
        pytest.param(b'{"model": "m"}', "file: input:", id="missing-input"),
        pytest.param(b"[" * 100_000, "file: json:", id="nested-too-deeply"),
        pytest.param(b'{"input": "data/x.jsonl", "n": 1' + b"1" * 5000 + b"}", "file: json:", id="huge-number"),
        pytest.param(
            b'{"input": "data/x.jsonl", "completion_window": "\xc2\xb2\xc2\xb2h"}',
            "file: completion_window:",
            id="non-ascii-digits",
        ),
    ],
)
def test_a_malformed_spec_is_rejected(env: Env, raw: bytes, expected: str) -> None:
    spec(env, "s.json", raw)
    job = env.take("s.json")
    report = assert_rejected(env, job, "s.json", raw)
    assert expected in report
    assert (env.inbox_dir / "data" / "x.jsonl").read_bytes() == GOOD


def test_an_absolute_input_is_rejected(env: Env) -> None:
    elsewhere = env.root / "elsewhere.jsonl"
    elsewhere.write_bytes(GOOD)
    raw = spec(env, "s.json", {"input": str(elsewhere)}, data=None)
    report = assert_rejected(env, env.take("s.json"), "s.json", raw)
    assert "file: input: must be a path relative to the inbox" in report
    assert elsewhere.read_bytes() == GOOD


@pytest.mark.parametrize("path", ["data/../data/x.jsonl", "../x.jsonl"])
def test_an_input_with_dotdot_is_rejected(env: Env, path: str) -> None:
    (env.root / "x.jsonl").write_bytes(GOOD)
    raw = spec(env, "s.json", {"input": path})
    report = assert_rejected(env, env.take("s.json"), "s.json", raw)
    assert "file: input:" in report and "`..`" in report
    assert (env.inbox_dir / "data" / "x.jsonl").read_bytes() == GOOD


def test_an_input_in_the_inbox_root_is_rejected(env: Env) -> None:
    raw = spec(env, "s.json", {"input": "x.jsonl"}, data_name="x.jsonl")
    report = assert_rejected(env, env.take("s.json"), "s.json", raw)
    assert "file: input: must name a file inside a sub-folder of the inbox" in report
    assert (env.inbox_dir / "x.jsonl").read_bytes() == GOOD


def test_an_input_through_a_symlinked_folder_is_rejected(env: Env) -> None:
    outside = env.root / "outside"
    outside.mkdir()
    (outside / "x.jsonl").write_bytes(GOOD)
    (env.inbox_dir / "linked").symlink_to(outside, target_is_directory=True)
    raw = spec(env, "s.json", {"input": "linked/x.jsonl"}, data=None)
    report = assert_rejected(env, env.take("s.json"), "s.json", raw)
    assert "file: input: linked/x.jsonl: symlinks are not followed" in report
    assert (outside / "x.jsonl").read_bytes() == GOOD
    assert (env.inbox_dir / "linked").is_symlink()


def test_a_missing_data_file_is_rejected(env: Env) -> None:
    raw = spec(env, "s.json", {"input": "data/nope.jsonl"})
    report = assert_rejected(env, env.take("s.json"), "s.json", raw)
    assert "file: input: data/nope.jsonl does not exist" in report


def test_a_spec_whose_data_is_claimed_by_another_spec_meanwhile_is_rejected(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = spec(env, "s.json", {"input": "data/x.jsonl"})
    validate = Inbox._validate
    taken = env.root / "taken-by-the-other-spec.jsonl"

    def validate_then_lose_the_data(self: Inbox, *args: Any, **kwargs: Any) -> Any:
        result = validate(self, *args, **kwargs)
        os.rename(env.inbox_dir / "data" / "x.jsonl", taken)
        return result

    monkeypatch.setattr(Inbox, "_validate", validate_then_lose_the_data)
    job = env.take("s.json")
    monkeypatch.undo()
    report = assert_rejected(env, job, "s.json", raw)
    assert "file: input: data/x.jsonl does not exist" in report
    assert taken.read_bytes() == GOOD


def test_a_spec_whose_data_has_bad_lines_is_rejected_and_the_data_stays(env: Env) -> None:
    data = request("a") + b"not json\n"
    raw = spec(env, "s.json", {"input": "data/x.jsonl"}, data=data)
    report = assert_rejected(env, env.take("s.json"), "s.json", raw)
    assert "data/x.jsonl" in report
    assert "line 2: json:" in report
    assert (env.inbox_dir / "data" / "x.jsonl").read_bytes() == data


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/batchd/x",
        "http://hooks.example.com/batchd/x",  # another scheme
        "https://hooks.example.com:8443/batchd/x",  # another port
        "https://hooks.example.com/other",  # another path
        "https://hooks.example.com:notaport/batchd/x",
        "https://[::1/batchd/x",
        "https://user:pw@hooks.example.com/batchd/x",
    ],
)
def test_a_webhook_url_outside_the_allow_list_is_rejected(env: Env, url: str) -> None:
    raw = spec(env, "s.json", {"input": "data/x.jsonl", "webhook_url": url})
    report = assert_rejected(env, env.take("s.json"), "s.json", raw)
    assert "file: webhook_url:" in report
    assert (env.inbox_dir / "data" / "x.jsonl").read_bytes() == GOOD


def test_a_webhook_url_inside_the_allow_list_is_accepted(env: Env) -> None:
    spec(env, "s.json", {"input": "data/x.jsonl", "webhook_url": ALLOWED + "team-a"})
    job = env.take("s.json")
    assert job.state is JobState.RECEIVED
    assert job.webhook_url == ALLOWED + "team-a"
    assert env.store.deliveries.select(job_id=job.id) == []


# ---------------------------------------------------------------- ignored entries


def test_ignored_entries_are_left_alone(env: Env) -> None:
    ignored = [".hidden.jsonl", "x.jsonl.tmp", "y.jsonl.part"]
    for name in ignored:
        env.drop(name, GOOD)
    env.drop("data/z.jsonl", GOOD)
    env.drop("x.csv", b"a,b\n")
    env.drop("ok.jsonl", GOOD)
    assert env.inbox.candidates() == [env.inbox_dir / "ok.jsonl", env.inbox_dir / "x.csv"]
    for name in [*ignored, "data", "rejected", ".batchd"]:
        assert env.inbox.take(env.inbox_dir / name) is None
    for name in ignored:
        assert (env.inbox_dir / name).read_bytes() == GOOD
    assert (env.inbox_dir / "data" / "z.jsonl").read_bytes() == GOOD
    assert env.store.jobs.select() == []
    assert list((env.inbox_dir / ".batchd" / "claimed").iterdir()) == []


def test_a_removed_inbox_has_no_candidates_until_it_is_back(env: Env) -> None:
    moved = env.root / "inbox.old"
    env.inbox_dir.rename(moved)
    assert env.inbox.candidates() == []
    env.inbox_dir.mkdir()
    env.drop("x.jsonl", GOOD)
    assert env.inbox.candidates() == [env.inbox_dir / "x.jsonl"]
    job = env.take("x.jsonl")
    assert job.state is JobState.RECEIVED
    assert Path(str(job.claimed_path)).read_bytes() == GOOD


# ---------------------------------------------------------------- accepted


def test_a_plain_request_file_is_claimed(env: Env) -> None:
    content = b"\xef\xbb\xbf" + request("a").replace(b"\n", b"\r\n") + b"\n" + request("b")
    env.drop("batch one.jsonl", content)
    job = env.take("batch one.jsonl")
    claim = env.inbox_dir / ".batchd" / "claimed" / job.id
    assert job.state is JobState.RECEIVED
    assert (job.name, job.source) == ("batch one", "batch one.jsonl")
    assert job.claimed_path == str(claim / "batch one.jsonl")
    assert (claim / "batch one.jsonl").read_bytes() == content
    assert not (env.inbox_dir / "batch one.jsonl").exists()
    upload = Path(str(job.upload_path))
    assert upload.parent == claim
    assert upload.read_bytes() == GOOD
    assert (job.request_count, job.endpoint) == (2, "/v1/chat/completions")
    assert (job.sha256, job.size_bytes) == (hashlib.sha256(GOOD).hexdigest(), len(GOOD))
    assert job.completion_window == "24h"
    assert env.store.jobs.get(job.id) == job
    assert env.store.deliveries.select(job_id=job.id) == []


def test_a_spec_overrides_the_model_in_the_upload_copy_only(env: Env) -> None:
    doc = {
        "input": "data/x.jsonl",
        "model": "override-model",
        "metadata": {"team": "search", "n": 1},
        "completion_window": "48h",
    }
    raw = spec(env, "s.json", doc)
    job = env.take("s.json")
    claim = env.inbox_dir / ".batchd" / "claimed" / job.id
    assert job.state is JobState.RECEIVED
    assert (job.name, job.source) == ("s", "s.json")
    assert job.spec_path == str(claim / "s.json")
    assert (claim / "s.json").read_bytes() == raw
    assert job.claimed_path == str(claim / "data" / "x.jsonl")
    assert (claim / "data" / "x.jsonl").read_bytes() == GOOD
    assert not (env.inbox_dir / "data" / "x.jsonl").exists()
    upload = Path(str(job.upload_path)).read_bytes()
    models = [json.loads(line)["body"]["model"] for line in upload.splitlines()]
    assert models == ["override-model", "override-model"]
    assert (job.sha256, job.request_count) == (hashlib.sha256(upload).hexdigest(), 2)
    assert job.model == "override-model"
    assert job.metadata == {"team": "search", "n": 1}
    assert job.completion_window == "48h"


# ---------------------------------------------------------------- recovery


class Crash(Exception):
    """Stands in for the process dying at a chosen point."""


def backdate(path: Path, seconds: float = 3600) -> None:
    """Make a folder look as if it last changed `seconds` ago (older than any lease)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_recover_takes_a_claimed_file_without_a_job(env: Env) -> None:
    # A claim folder of an older release (no marker), older than the lease.
    job_id = uuid.uuid4().hex
    claim = env.inbox_dir / ".batchd" / "claimed" / job_id
    claim.mkdir()
    (claim / "x.jsonl").write_bytes(GOOD)
    backdate(claim)
    jobs = env.inbox.recover()
    assert [(j.id, j.state, j.source) for j in jobs] == [(job_id, JobState.RECEIVED, "x.jsonl")]
    assert (claim / "x.jsonl").read_bytes() == GOOD
    assert env.inbox.recover() == []


def test_recover_takes_a_spec_whose_data_was_already_claimed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_args: Any, **_kw: Any) -> Any:
        raise Crash

    spec(env, "s.json", {"input": "data/x.jsonl", "model": "o"})
    monkeypatch.setattr("batchd.inbox.write_upload_copy", crash)
    with pytest.raises(Crash):
        env.inbox.take(env.inbox_dir / "s.json")
    monkeypatch.undo()
    (job,) = env.inbox.recover()
    assert job.state is JobState.RECEIVED
    assert Path(str(job.claimed_path)).read_bytes() == GOOD
    assert Path(str(job.claimed_path)).parent.parent.name == job.id


def test_recover_removes_an_empty_claim_folder(env: Env) -> None:
    claim = env.inbox_dir / ".batchd" / "claimed" / uuid.uuid4().hex
    claim.mkdir()
    backdate(claim)
    assert env.inbox.recover() == []
    assert not claim.exists()
    assert env.store.jobs.select() == []


def test_recover_finishes_a_rejection_interrupted_before_the_move(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_args: Any, **_kw: Any) -> None:
        raise Crash

    content = request("a") + b"{oops\n"
    env.drop("bad.jsonl", content)
    monkeypatch.setattr(Inbox, "_finish_rejection", crash)
    with pytest.raises(Crash):
        env.inbox.take(env.inbox_dir / "bad.jsonl")
    monkeypatch.undo()
    (job,) = env.store.jobs.select()
    assert job.state is JobState.REJECTED
    assert Path(str(job.claimed_path)).read_bytes() == content
    assert not Path(str(job.rejected_path)).exists()

    assert env.inbox.recover() == []
    report = assert_rejected(env, job, "bad.jsonl", content)
    assert "line 2: json:" in report
    assert env.inbox.recover() == []  # nothing left to do; no second event
    assert len(env.store.deliveries.select()) == 1


def test_recover_finishes_a_rejection_interrupted_before_its_commit(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_args: Any, **_kw: Any) -> Job:
        raise Crash

    env.drop("x.csv", b"a,b\n")
    monkeypatch.setattr(env.store.jobs, "insert_rejected", crash)
    with pytest.raises(Crash):
        env.inbox.take(env.inbox_dir / "x.csv")
    monkeypatch.undo()
    assert env.store.jobs.select() == []
    assert list((env.inbox_dir / "rejected").iterdir()) == []
    (job,) = env.inbox.recover()
    assert_rejected(env, job, "x.csv", b"a,b\n")
    assert sorted(p.name for p in (env.inbox_dir / "rejected").iterdir()) == ["x.csv", "x.csv.errors.txt"]


def test_two_daemons_rejecting_the_same_name_keep_both_files(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_args: Any, **_kw: Any) -> None:
        raise Crash

    # Daemon A has committed its rejection of x.csv but not yet moved the file...
    env.drop("x.csv", b"from A")
    monkeypatch.setattr(Inbox, "_finish_rejection", crash)
    with pytest.raises(Crash):
        env.inbox.take(env.inbox_dir / "x.csv")
    monkeypatch.undo()
    (job_a,) = env.store.jobs.select()
    # ...when daemon B, sharing the inbox, rejects another x.csv.
    other = Inbox(lambda: env.settings, env.store)
    env.drop("x.csv", b"from B")
    job_b = other.take(env.inbox_dir / "x.csv")
    assert job_b is not None
    env.inbox.recover()
    assert_rejected(env, job_a, "x.csv", b"from A")
    assert_rejected(env, job_b, "x.csv", b"from B", as_name=f"x.{job_b.id[:8]}.csv")


def test_recover_keeps_a_claim_folder_it_cannot_read_as_a_submission(env: Env) -> None:
    # Not a regular file (a FIFO that was claimed to be rejected): never opened, never lost.
    claim = env.inbox_dir / ".batchd" / "claimed" / uuid.uuid4().hex
    claim.mkdir()
    os.mkfifo(claim / "pipe.jsonl")
    backdate(claim)
    (job,) = env.inbox.recover()
    assert job.state is JobState.REJECTED
    assert (env.inbox_dir / "rejected" / "pipe.jsonl").is_fifo()


def test_a_fifo_is_rejected_without_being_opened(env: Env) -> None:
    os.mkfifo(env.inbox_dir / "pipe.jsonl")
    job = env.take("pipe.jsonl")
    assert job.state is JobState.REJECTED
    report = Path(str(job.report_path)).read_text(encoding="utf-8")
    assert "not a regular file" in report
    assert (env.inbox_dir / "rejected" / "pipe.jsonl").is_fifo()


def test_two_takes_of_one_path_make_one_job(env: Env) -> None:
    env.drop("x.jsonl", GOOD)
    first = env.inbox.take(env.inbox_dir / "x.jsonl")
    second = env.inbox.take(env.inbox_dir / "x.jsonl")
    assert first is not None and second is None
    assert [j.id for j in env.store.jobs.select()] == [first.id]
    assert [p.name for p in (env.inbox_dir / ".batchd" / "claimed").iterdir()] == [first.id]


# ---------------------------------------------------------------- watching


async def test_watcher_reports_renamed_and_closed_files(env: Env) -> None:
    watcher = InboxWatcher(env.inbox_dir)
    stop = anyio.Event()
    try:
        (env.inbox_dir / "a.jsonl.tmp").write_bytes(GOOD)
        os.rename(env.inbox_dir / "a.jsonl.tmp", env.inbox_dir / "a.jsonl")
        (env.inbox_dir / "b.jsonl").write_bytes(GOOD)
        ready: set[str] = set()
        with anyio.fail_after(10):
            while ready != {"a.jsonl", "b.jsonl"}:
                events = await watcher.read(timeout=1, stop=stop)
                ready |= {e.path.name for e in events if e.kind == "ready"}
    finally:
        watcher.close()


async def test_watcher_read_returns_when_stopped(env: Env) -> None:
    watcher = InboxWatcher(env.inbox_dir)
    stop = anyio.Event()

    async def stopper() -> None:
        stop.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stopper)  # runs once read() is waiting
            with anyio.fail_after(5):
                assert await watcher.read(timeout=60, stop=stop) == []
    finally:
        watcher.close()


async def test_watcher_watches_a_recreated_folder_again(tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    watcher = InboxWatcher(folder)
    stop = anyio.Event()
    try:
        folder.rmdir()
        kinds: list[str] = []
        with anyio.fail_after(10):
            while "rescan" not in kinds:
                kinds += [e.kind for e in await watcher.read(timeout=1, stop=stop)]
        folder.mkdir()
        with anyio.fail_after(10):
            assert [e.kind for e in await watcher.read(timeout=1, stop=stop)] == ["rescan"]
        (folder / "x.jsonl").write_bytes(GOOD)
        ready: list[str] = []
        with anyio.fail_after(10):
            while not ready:
                ready = [e.path.name for e in await watcher.read(timeout=1, stop=stop) if e.kind == "ready"]
        assert ready == ["x.jsonl"]
    finally:
        watcher.close()


def test_the_uniqueness_check_spills_into_the_daemons_own_state_not_the_system_temp(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DESIGN §10: nothing is written outside batchd's folders, the scratch of a big file included.
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    monkeypatch.setattr("batchd.validation._SEEN_IN_MEMORY", 2)
    spilled: list[Path] = []
    real_connect = sqlite3.connect

    def watch(path: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        spilled.append(Path(path))
        conn: sqlite3.Connection = real_connect(path, *args, **kwargs)
        return conn

    monkeypatch.setattr("batchd.store.scratch.sqlite3.connect", watch)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}} for i in range(5)]  # fmt: skip
    env.drop("big.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    job = env.take("big.jsonl")
    assert job.state is JobState.RECEIVED and job.request_count == 5
    assert spilled and all(p.is_relative_to(env.settings.state_dir / "work") for p in spilled)
    assert list(system_temp.iterdir()) == []
    assert not any(p.exists() for p in spilled), "the scratch file is removed after the check"


def test_a_burst_is_taken_in_one_call_each_file_on_its_own_the_jobs_in_one_commit(env: Env) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        env.drop(name, GOOD)
    env.drop("bad.jsonl", request("a") + b"{oops\n")
    paths = [env.inbox_dir / n for n in ("a.jsonl", "bad.jsonl", "gone.jsonl", "b.jsonl")]
    jobs = env.inbox.take_many(paths)
    by_source = {job.source: job for job in jobs}
    assert sorted(by_source) == ["a.jsonl", "b.jsonl", "bad.jsonl"]  # the file gone meanwhile: nothing
    assert by_source["bad.jsonl"].state is JobState.REJECTED  # rejected alone, the others go on
    for name in ("a.jsonl", "b.jsonl"):
        job = by_source[name]
        assert job.state is JobState.RECEIVED and env.store.jobs.get(job.id) == job
        assert Path(str(job.claimed_path)).read_bytes() == GOOD


def test_a_burst_whose_commit_fails_leaves_every_claim_to_the_recovery(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_gone(*_args: Any, **_kw: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    for name in ("a.jsonl", "b.jsonl"):
        env.drop(name, GOOD)
    monkeypatch.setattr(env.store.jobs, "insert_many", database_gone)
    with pytest.raises(sqlite3.OperationalError):
        env.inbox.take_many([env.inbox_dir / "a.jsonl", env.inbox_dir / "b.jsonl"])
    monkeypatch.undo()
    assert env.store.jobs.select() == [] and not (env.inbox_dir / "a.jsonl").exists()
    # Nothing lost: the next recovery pass records both claims (this process's own, deferred).
    recovered = env.inbox.recover_abandoned()
    assert sorted(job.source for job in recovered) == ["a.jsonl", "b.jsonl"]
    assert all(job.state is JobState.RECEIVED for job in recovered)


def test_jobs_inserted_together_are_each_recorded_once(env: Env) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        env.drop(name, GOOD)
    first = env.inbox.take_many([env.inbox_dir / "a.jsonl"])
    news = [replace_id(env, first[0]), replace_id(env, None)]
    # One of them exists already (another daemon recorded the same claim first): each stands once.
    again = env.store.jobs.insert_many(news)
    assert [job.id for job in again] == [news[0].id, news[1].id]
    assert again[0] == first[0]
    assert len(env.store.jobs.select()) == 2


def replace_id(env: Env, job: Job | None) -> NewJob:
    """The NewJob of `job` as a second daemon would insert it again (or a fresh one)."""
    if job is not None:
        return NewJob(id=job.id, name=job.name, source=job.source, provider=job.provider)
    return NewJob(id=uuid.uuid4().hex, name="c", source="c.jsonl", provider="local")


def test_a_rejections_event_is_not_sent_before_its_file_is_in_rejected(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchd import rejections

    finish = rejections.finish
    seen: list[int] = []

    def watched(*args: Any, **kwargs: Any) -> None:
        # While the file is being moved, its event is recorded but not due: a receiver told of
        # the rejection always finds rejected/NAME and its report.
        seen.append(len(env.store.deliveries.due(env.store.now() + 1)))
        finish(*args, **kwargs)

    monkeypatch.setattr(rejections, "finish", watched)
    env.drop("empty.jsonl", b"")
    job = env.take("empty.jsonl")
    assert seen == [0]
    (due,) = env.store.deliveries.due(env.store.now())
    assert due.job_id == job.id and due.event_type == "batch.rejected"
    assert (env.inbox_dir / "rejected" / "empty.jsonl").exists()


def test_a_rejections_event_held_by_a_kill_before_the_move_goes_once_recovery_moved_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchd import rejections

    def killed(*_: Any, **__: Any) -> None:
        raise SystemExit("killed before the move")

    env.drop("empty.jsonl", b"")
    with monkeypatch.context() as kill:
        # A kill runs nothing after it: neither the move nor the release that follows it.
        kill.setattr(rejections, "finish", killed)
        kill.setattr(env.store.deliveries, "release_held", lambda *_, **__: 0)
        with pytest.raises(SystemExit):
            env.take("empty.jsonl")
    (job,) = env.store.jobs.select([JobState.REJECTED])
    assert env.store.deliveries.due(env.store.now() + 1) == []  # recorded, held
    assert env.store.deliveries.next_due_at() is None
    env.inbox.recover()
    assert (env.inbox_dir / "rejected" / "empty.jsonl").exists()
    (due,) = env.store.deliveries.due(env.store.now())
    assert due.job_id == job.id
