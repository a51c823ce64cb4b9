"""The real `batchd run` against what issue #13 names for intake: bad claims at start-up, a
joining daemon and a claim in progress, symlinks planted by a group member, files written in
place, file modes. Each test shows the daemon still running and still taking new work,
nothing written outside its folders, and every request of every file accounted for in the
outbox or in a rejection report (or, for a file changed after it was taken, the job saying so).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from batchd import claims
from batchd.store import Store
from tests.acceptance.conftest import DaemonProcess, Harness, Workspace, chat, eventually, harness, read_jsonl
from tests.acceptance.test_cluster import cluster, start
from tests.acceptance.test_daemon import assert_accounted, job_json
from tests.databases import POSTGRESQL, is_sqlite

pytestmark = pytest.mark.each_database

STRANGER = 4242
BAD = b'{"custom_id": "a", oops}\n'


def lines_of(sent: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in sent).encode()


def events(h: Harness) -> dict[str, dict[str, Any]]:
    """Each job's webhook event by its source file name."""
    return {e["data"]["source"]: e for e in h.receiver.verified()}


async def finishes_new_work(h: Harness, daemon: DaemonProcess, name: str) -> None:
    """Still running, and a new file dropped now completes."""
    sent = [chat(f"{name}-1"), chat(f"{name}-2")]
    h.ws.drop(f"{name}.jsonl", sent)
    await h.receiver.wait_for(lambda hooks: any(x.event["data"]["source"] == f"{name}.jsonl" for x in hooks))
    assert events(h)[f"{name}.jsonl"]["type"] == "batch.completed"
    assert_accounted(h.ws, name, sent)
    assert daemon.proc.poll() is None


async def stop(daemon: DaemonProcess) -> None:
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(timeout=15) == 0


# ---------------------------------------------------------------- 4. planted symlinks


async def test_planted_symlink_farms_are_refused_and_the_daemon_goes_on(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"untouched")
    async with harness(tmp_path) as h:
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        database = Path(h.ws.database_url.removeprefix("sqlite:///")) if is_sqlite(h.ws.database_url) else None
        # A member swaps rejected/ for a folder of their own, full of symlinks at names batchd
        # would write (possible where the inbox lacks the sticky bit): the temp name of the next
        # report points at the daemon's own database, as in the reproduction.
        inbox = h.ws.inbox
        farm = {
            ".bad.jsonl.errors.txt.tmp": database or outside / "sentinel",
            "old.jsonl.errors.txt": outside / "sentinel",
            ".old.jsonl.errors.txt.tmp": outside / "would-be-new",
        }
        (inbox / "rejected").rename(tmp_path / "rejected-was")
        (inbox / "rejected").mkdir()
        for name, target in farm.items():
            (inbox / "rejected" / name).symlink_to(target)
        os.chown(inbox / "rejected", STRANGER, STRANGER)
        # And .batchd/'s folders for symlinks out of the inbox.
        for folder in ("work", "quarantine"):
            (inbox / ".batchd" / folder).symlink_to(outside)
        header = database.read_bytes()[:16] if database else b""

        h.ws.drop("bad.jsonl", BAD)
        # One request fails once: its follow-up round is written under .batchd/work/.
        good = [chat("g-1"), chat("g-2", trigger={"fail_once": 503}), chat("g-3")]
        h.ws.drop("good.jsonl", good)
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 2)

        assert sorted(p.name for p in outside.iterdir()) == ["sentinel"]
        assert (outside / "sentinel").read_bytes() == b"untouched"
        if database:
            assert database.read_bytes()[:16] == header == b"SQLite format 3\x00"
        found = events(h)
        assert found["bad.jsonl"]["type"] == "batch.rejected"
        assert (inbox / "rejected" / "bad.jsonl").read_bytes() == BAD
        assert "line 1" in (inbox / "rejected" / "bad.jsonl.errors.txt").read_text(encoding="utf-8")
        assert found["good.jsonl"]["type"] == "batch.completed"
        assert_accounted(h.ws, "good", good)
        assert len(job_json(h.ws, "good")["rounds"]) == 2
        # The planted entries are moved aside, whole, and logged.
        (aside,) = inbox.glob("rejected.planted-*")
        assert {p.name: p.readlink() for p in aside.iterdir()} == farm
        assert (inbox / ".batchd" / "work").is_dir() and not (inbox / ".batchd" / "work").is_symlink()
        assert {e["path"] for e in daemon.logs_named("fs.planted_moved_aside")} >= {
            str(inbox / "rejected"),
            str(inbox / ".batchd" / "work"),
        }
        await finishes_new_work(h, daemon, "after")
        await stop(daemon)


# ---------------------------------------------------------------- 2. bad claims at start-up


def claim_folder(ws: Workspace, name: str, kind: str, content: bytes, claimer: str | None) -> Path:
    """A claim a crash left without a job: by `claimer` (None: an older release, long ago)."""
    folder = ws.inbox / ".batchd" / "claimed" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    if claimer is not None:
        claims.write_marker(folder, claimer, time.time())
    if kind == "folder":
        (folder / name).mkdir()
    elif kind == "fifo":
        os.mkfifo(folder / name)
    else:
        (folder / name).write_bytes(content)
    if claimer is None:
        then = time.time() - 3600
        os.utime(folder, (then, then))
    return folder


def is_report(path: Path, folder: Path) -> bool:
    return path.is_file() and path.parent == folder and len(path.name.encode()) <= 255


async def test_start_up_reports_each_claim_it_cannot_take_and_finishes_the_others(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # This daemon's earlier incarnation (same host and state directory) crashed mid-take.
        earlier = uuid.uuid4().hex
        store = Store(h.ws.database_url)
        store.migrate()
        host = socket.gethostname()
        store.cluster.register(earlier, host=host, pid=1, home=f"{host}:{h.ws.root / 'state'}")
        store.close()
        long_name = "x" * (255 - len(".jsonl")) + ".jsonl"
        good = [chat("c-1"), chat("c-2")]
        made = {
            "folder.jsonl": claim_folder(h.ws, "folder.jsonl", "folder", b"", None),
            "pipe.jsonl": claim_folder(h.ws, "pipe.jsonl", "fifo", b"", earlier),
            long_name: claim_folder(h.ws, long_name, "file", BAD, earlier),
            "crashed.jsonl": claim_folder(h.ws, "crashed.jsonl", "file", lines_of(good), earlier),
        }
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 4)

        found = events(h)
        for name in ("folder.jsonl", "pipe.jsonl", long_name):
            data = found[name]["data"]
            assert found[name]["type"] == "batch.rejected" and data["id"] == made[name].name
            assert is_report(Path(data["report_file"]), h.ws.inbox / "rejected")
        assert (h.ws.inbox / "rejected" / "pipe.jsonl").is_fifo()
        assert (h.ws.inbox / "rejected" / "folder.jsonl").is_dir()
        (shortened,) = [p for p in (h.ws.inbox / "rejected").iterdir() if p.name.startswith("xxx")
                        and not p.name.endswith(".errors.txt")]  # fmt: skip
        assert shortened.read_bytes() == BAD and made[long_name].name[:8] in shortened.name
        assert found["crashed.jsonl"]["type"] == "batch.completed"
        assert_accounted(h.ws, "crashed", good)
        await finishes_new_work(h, daemon, "later")
        await stop(daemon)


# ---------------------------------------------------------------- 3. a joining daemon and a claim in progress


@pytest.mark.each_database(POSTGRESQL)
async def test_a_joining_daemon_leaves_a_live_claim_alone_and_takes_it_once_its_claimer_is_gone(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        homes = cluster(h, 2)
        (first,) = start(h, homes[:1])
        await first.until_logged("daemon.registered")
        claimer = first.logs_named("daemon.registered")[0]["daemon_id"]
        await first.until_logged("daemon.ready")
        # The first daemon's take between its rename and its commit: marker, file, no job row.
        held = [chat("h-1"), chat("h-2")]
        folder = claim_folder(h.ws, "held.jsonl", "file", lines_of(held), claimer)

        (second,) = start(h, homes[1:])
        await second.until_logged("daemon.ready")
        assert [e["job_id"] for e in second.logs_named("inbox.claim_in_progress")] == [folder.name]
        store = Store(h.ws.database_url)
        try:
            assert store.jobs.get(folder.name) is None
            assert claims.read_claimer(folder) == claimer and (folder / "held.jsonl").is_file()

            first.proc.kill()
            assert await first.wait() == -9
            await h.receiver.wait_for(lambda hooks: len(hooks) >= 1, timeout=60)
            (event,) = h.receiver.verified()
            assert event["type"] == "batch.completed" and event["data"]["id"] == folder.name
            assert_accounted(h.ws, "held", held)
            job = store.jobs.get(folder.name)
            assert job is not None and [j.id for j in store.jobs.select()] == [folder.name]
        finally:
            store.close()
        assert [e["job_id"] for e in second.logs_named("inbox.recovering_claim")] == [folder.name]
        assert len(await h.emulator.creates()) == 1
        await finishes_new_work(h, second, "after")
        await stop(second)


# ---------------------------------------------------------------- 5. files written in place


async def test_a_file_its_writer_keeps_open_is_taken_only_once_closed(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        daemon = h.start("--log-level", "debug")
        await daemon.until_logged("daemon.ready")
        sent = [chat(f"w-{i}") for i in range(5)]
        path = h.ws.inbox / "written.jsonl"
        with path.open("wb") as writer:
            writer.write(lines_of(sent[:1]))
            writer.flush()
            # Once the daemon has heard of the write (a rescan counts the file as being written)...
            await eventually(lambda: any(e["writing"] for e in daemon.logs_named("inbox.rescanned")), 30)
            # ...it looks quiet for longer than settle_s, as far as its modification time says.
            then = time.time() - 60
            os.utime(path, (then, then))
            seen = len(daemon.logs_named("inbox.rescanned"))

            def two_rescans_or_a_claim() -> bool:
                return daemon.has_logged("inbox.claimed") or len(daemon.logs_named("inbox.rescanned")) >= seen + 2

            await eventually(two_rescans_or_a_claim, 30)
            assert not daemon.has_logged("inbox.claimed"), "taken while its writer still had it open"
            for line in sent[1:]:
                writer.write(lines_of([line]))
                writer.flush()
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        assert h.receiver.verified()[0]["type"] == "batch.completed"
        assert_accounted(h.ws, "written", sent)
        assert job_json(h.ws, "written")["source_changed"] is None
        await finishes_new_work(h, daemon, "next")
        await stop(daemon)


async def test_a_file_appended_to_after_it_was_taken_says_so_on_its_job(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        sent = [chat("l-1"), chat("l-2")]
        late = chat("l-3")
        path = h.ws.inbox / "late.jsonl"
        # Two writers: the first closes (batchd takes the file), the second still holds it open.
        second = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            with path.open("ab") as first:
                first.write(lines_of(sent))
            await daemon.until_logged("inbox.accepted")
            os.write(second, lines_of([late]))
        finally:
            os.close(second)
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)

        assert_accounted(h.ws, "late", sent)
        reason = job_json(h.ws, "late")["source_changed"]
        assert isinstance(reason, str) and "grew from" in reason
        (logged,) = daemon.logs_named("job.source_changed")
        assert logged["reason"] == reason
        shown = await h.ws.batchd("show", "late", "--json")
        assert json.loads(shown.stdout)["source_changed"] == reason
        human = await h.ws.batchd("show", "late")
        assert "changed after it was taken" in human.stdout
        await finishes_new_work(h, daemon, "next")
        await stop(daemon)


# ---------------------------------------------------------------- 9. modes


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def test_what_the_daemon_makes_has_explicit_modes_whatever_the_umask(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # The embedded backend, so that its signing secret is made too.
        config = h.ws.config.read_text(encoding="utf-8")
        config = config.replace('kind = "together"', 'kind = "local"').replace(f'base_url = "{h.emulator.url}"', "")
        h.ws.config.write_text(config, encoding="utf-8")
        with umask(0):
            daemon = h.start()
        await daemon.until_logged("daemon.ready")
        sent = [chat("m-1")]
        h.ws.drop("good.jsonl", sent)
        h.ws.drop("bad.jsonl", BAD)
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 2)
        assert_accounted(h.ws, "good", sent)

        state = h.ws.root / "state"
        assert mode(state) == 0o750
        assert mode(state / "local" / "secret") == 0o600
        if is_sqlite(h.ws.database_url):
            for name in ("batchd.db", "batchd.db-wal", "batchd.db-shm"):
                assert mode(state / name) == 0o600, name
        folder = h.ws.outbox / "good"
        assert mode(folder) & 0o777 == 0o750 and mode(h.ws.outbox) & 0o777 == 0o750
        assert [mode(folder / n) for n in ("output.jsonl", "job.json")] == [0o640, 0o640]
        assert mode(h.ws.inbox) == 0o3770
        assert mode(h.ws.inbox / "rejected") & 0o777 == 0o750
        assert mode(h.ws.inbox / "rejected" / "bad.jsonl.errors.txt") == 0o640
        # Nothing batchd made can be read or written by others (the dropped files are the user's).
        dropped = {"good.jsonl", "bad.jsonl"}
        for path in [state, *state.rglob("*")]:
            if path.name not in dropped and not path.is_symlink():
                assert mode(path) & 0o007 == 0, f"{path} is {oct(mode(path))}"
        assert read_jsonl(folder / "output.jsonl")[0]["custom_id"] == "m-1"
        await finishes_new_work(h, daemon, "next")
        await stop(daemon)
