"""The inbox under attack and after crashes (issue #13): planted symlinks are never followed,
one bad claim never stops recovery, a claim in progress is never stolen, a job is recorded
once, a file that changes while it is taken is read again. Real folders, a real Store
(SQLite and PostgreSQL).

The tests run as root, whom permissions do not stop: "a folder someone else owns" is made
with chown, and what is checked is where writes land and what is followed.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchd import claims, rejections
from batchd.inbox import Inbox
from batchd.models import JobState
from batchd.specs import spec_data
from batchd.store import Hold, NewJob, RejectedJob, Store
from batchd.upload_copy import write_upload_copy
from batchd.validation import validate_stream
from batchd.watch import InboxWatcher
from batchd.webhooks import build_event
from tests.databases import database_url, is_sqlite
from tests.hand_clock import Clock
from tests.integration import test_inbox
from tests.integration.test_inbox import GOOD, Env, assert_rejected, request, spec

pytestmark = pytest.mark.each_database

#: The inbox test module's fixture: an Inbox over real folders and a Store.
env = test_inbox.env

STRANGER = 4242
BAD = request("a") + b"{oops\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the inbox with a sentinel file: nothing may ever change in it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "sentinel").write_bytes(b"untouched")
    return folder


def database_file(env: Env) -> Path | None:
    return Path(env.store.url.removeprefix("sqlite:///")) if is_sqlite(env.store.url) else None


def fingerprint(env: Env, outside: Path) -> dict[str, bytes]:
    """What must never change: the sentinel folder, and the database file's header (its pages
    may move between it and its write-ahead log; a report written through it would not)."""
    found = {str(p): p.read_bytes() for p in sorted(outside.iterdir())}
    db = database_file(env)
    if db is not None:
        with db.open("rb") as stream:
            found[str(db)] = stream.read(16)
        assert found[str(db)] == b"SQLite format 3\x00"
    return found


def farm(folder: Path, targets: list[Path], names: list[str], *, owner: int | None) -> None:
    """A folder of symlinks at the names batchd would write, pointing at `targets`."""
    folder.mkdir()
    for i, name in enumerate(names):
        (folder / name).symlink_to(targets[i % len(targets)])
    if owner is not None:
        os.chown(folder, owner, owner)


def planted(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f"{name}.planted-*"))


# ---------------------------------------------------------------- symlinks planted by a group member


@pytest.mark.parametrize("owner", [STRANGER, None], ids=["a member's folder", "batchd's own folder"])
def test_a_symlink_farm_in_rejected_is_never_written_through(env: Env, outside: Path, owner: int | None) -> None:
    db = database_file(env)
    targets = [outside / "sentinel"] if db is None else [outside / "sentinel", db]
    names = ["bad.jsonl", "bad.jsonl.errors.txt", ".bad.jsonl.errors.txt.tmp"]
    rejected = env.inbox_dir / "rejected"
    rejected.rename(env.root / "rejected-was")
    farm(rejected, [*targets, outside / "new"], names, owner=owner)
    before = fingerprint(env, outside)
    env.drop("bad.jsonl", BAD)
    job = env.take("bad.jsonl")

    assert fingerprint(env, outside) == before
    assert not (outside / "new").exists()
    assert env.store.jobs.get(job.id) == job  # the database is whole
    if owner == STRANGER:
        # Someone else's folder: moved aside (never deleted), a fresh rejected/ made.
        (aside,) = planted(env.inbox_dir, "rejected")
        assert sorted(p.name for p in aside.iterdir()) == sorted(names)
        assert_rejected(env, job, "bad.jsonl", BAD)
    else:
        # batchd's own folder with planted names: those names are passed over.
        assert_rejected(env, job, "bad.jsonl", BAD, as_name=f"bad.{job.id[:8]}.jsonl")
        assert all((rejected / n).is_symlink() for n in names)


@pytest.mark.parametrize("where", [".batchd", ".batchd/claimed"])
def test_a_symlink_in_place_of_batchds_folders_is_moved_aside(env: Env, outside: Path, where: str) -> None:
    folder = env.inbox_dir / where
    folder.rename(env.root / "moved-by-a-member")
    folder.parent.mkdir(exist_ok=True)
    folder.symlink_to(outside)
    before = fingerprint(env, outside)
    env.drop("x.jsonl", GOOD)
    job = env.take("x.jsonl")

    assert job.state is JobState.RECEIVED
    assert fingerprint(env, outside) == before
    claimed = Path(str(job.claimed_path))
    assert claimed.read_bytes() == GOOD and claimed.is_relative_to(env.inbox_dir / ".batchd" / "claimed")
    assert not (env.inbox_dir / where).is_symlink()
    (aside,) = planted(folder.parent, folder.name)
    assert aside.is_symlink() and aside.readlink() == outside


def test_a_data_folder_swapped_for_a_symlink_after_its_check_is_refused(
    env: Env, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = spec(env, "s.json", {"input": "data/x.jsonl"})
    (outside / "x.jsonl").write_bytes(GOOD)
    before = fingerprint(env, outside)

    def check_then_swap(*args: Any) -> Any:
        found = spec_data(*args)
        (env.inbox_dir / "data").rename(env.root / "data-was")
        (env.inbox_dir / "data").symlink_to(outside)
        return found

    monkeypatch.setattr("batchd.inbox.spec_data", check_then_swap)
    job = env.take("s.json")
    report = assert_rejected(env, job, "s.json", raw)
    assert "symlinks are not followed" in report
    assert fingerprint(env, outside) == before


# ---------------------------------------------------------------- one bad claim never stops recovery


def claim_of_a_gone_daemon(env: Env, name: str, kind: str = "file", content: bytes = BAD) -> Path:
    """A claim folder whose claimer stopped before recording its job, holding a file, a FIFO or a folder."""
    if not env.store.cluster.states(["gone"], now=env.store.now(), lease_s=30):
        env.store.cluster.register("gone", host="h", pid=1, home="h:/gone")
        env.store.cluster.release("gone")
    folder = env.inbox_dir / ".batchd" / "claimed" / uuid.uuid4().hex
    folder.mkdir()
    claims.write_marker(folder, "gone", time.time())
    if kind == "fifo":
        os.mkfifo(folder / name)
    elif kind == "folder":
        (folder / name).mkdir()
    else:
        (folder / name).write_bytes(content)
    return folder


def test_recovery_reports_each_bad_claim_and_goes_on(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    long_name = "x" * (255 - len(".jsonl")) + ".jsonl"
    directory = claim_of_a_gone_daemon(env, "folder.jsonl", "folder")
    fifo = claim_of_a_gone_daemon(env, "pipe.jsonl", "fifo")
    too_long = claim_of_a_gone_daemon(env, long_name)
    stuck = claim_of_a_gone_daemon(env, "stuck.jsonl")
    good = claim_of_a_gone_daemon(env, "good.jsonl", content=GOOD)
    reserve = rejections.reserve

    def refuse_one(inbox_dir: Path, source: str, job_id: str, report: str) -> Any:
        if source == "stuck.jsonl":
            raise OSError(errno.ENAMETOOLONG, "File name too long", source)
        return reserve(inbox_dir, source, job_id, report)

    monkeypatch.setattr("batchd.rejections.reserve", refuse_one)
    jobs = {Path(str(j.claimed_path)).parent.name: j for j in env.inbox.recover()}

    assert jobs[good.name].state is JobState.RECEIVED
    for folder in (directory, fifo, too_long):
        job = jobs[folder.name]
        assert job.state is JobState.REJECTED and Path(str(job.report_path)).is_file()
        assert os.path.lexists(str(job.rejected_path))
    assert "not a regular file" in Path(str(jobs[directory.name].report_path)).read_text()
    short = Path(str(jobs[too_long.name].rejected_path))
    assert short.name.endswith(f".{too_long.name[:8]}.jsonl") and short.read_bytes() == BAD
    assert "x" * 40 in Path(str(jobs[too_long.name].report_path)).read_text()
    # The one that could not even be rejected is moved aside whole, nothing lost.
    assert stuck.name not in jobs and not stuck.exists()
    assert (env.inbox_dir / ".batchd" / "quarantine" / stuck.name / "stuck.jsonl").read_bytes() == BAD
    assert env.inbox.recover() == []


def test_a_take_that_fails_for_a_passing_reason_is_taken_again_by_the_next_pass(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_down(_new: Any) -> Any:
        raise RuntimeError("the database is down")

    env.drop("x.jsonl", GOOD)
    # A take records through insert_many (a lone file too); recovery through insert.
    monkeypatch.setattr(env.store.jobs, "insert", database_down)
    monkeypatch.setattr(env.store.jobs, "insert_many", database_down)
    with pytest.raises(RuntimeError):
        env.inbox.take(env.inbox_dir / "x.jsonl")
    monkeypatch.undo()
    assert env.store.jobs.select() == []
    (job,) = env.inbox.recover_abandoned()
    assert job.state is JobState.RECEIVED and Path(str(job.claimed_path)).read_bytes() == GOOD


# ---------------------------------------------------------------- claims in a cluster


@pytest.fixture
def cluster_store(tmp_path: Path) -> Iterator[tuple[Store, Clock]]:
    clock = Clock()
    store = Store(database_url(tmp_path / "cluster.db"), clock=clock)
    store.migrate()
    yield store, clock
    store.close()


def daemon_inbox(env: Env, store: Store, daemon_id: str) -> Inbox:
    store.cluster.register(daemon_id, host="h", pid=1, home=f"h:/{daemon_id}")
    return Inbox(lambda: env.settings, store, owner=lambda: Hold(daemon_id, 1, store.now() + 30))


def claim_in_progress(env: Env, claimer: str, name: str = "x.jsonl") -> Path:
    """What a live daemon's take looks like between its rename and its commit."""
    folder = env.inbox_dir / ".batchd" / "claimed" / uuid.uuid4().hex
    folder.mkdir()
    claims.write_marker(folder, claimer, time.time())
    (folder / name).write_bytes(GOOD)
    return folder


@pytest.mark.parametrize("how", ["stopped", "silent for a lease"])
def test_a_claim_in_progress_is_taken_only_once_its_claimer_is_gone(
    env: Env, cluster_store: tuple[Store, Clock], how: str
) -> None:
    store, clock = cluster_store
    daemon_inbox(env, store, "a")
    joining = daemon_inbox(env, store, "b")
    folder = claim_in_progress(env, "a")

    assert joining.recover() == []
    assert joining.recover_abandoned() == []
    assert store.jobs.select() == [] and (folder / "x.jsonl").exists()

    if how == "stopped":
        store.cluster.release("a")
    else:
        clock.now += env.settings.cluster.lease_s + 1
        store.cluster.renew("b")
    (job,) = joining.recover_abandoned()
    assert job.id == folder.name and job.state is JobState.RECEIVED and job.owner == "b"
    assert claims.read_claimer(folder) == "b"
    assert joining.recover_abandoned() == []


def test_a_claim_of_this_process_in_progress_is_not_recovered(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[Any]] = []
    validate = Inbox._validate

    def recover_meanwhile(self: Inbox, *args: Any, **kwargs: Any) -> Any:
        seen.append(self.recover())
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(Inbox, "_validate", recover_meanwhile)
    env.drop("x.jsonl", GOOD)
    job = env.take("x.jsonl")
    assert seen == [[]] and [j.id for j in env.store.jobs.select()] == [job.id]


def test_a_marker_naming_an_unknown_daemon_waits_for_the_lease(env: Env) -> None:
    folder = claim_in_progress(env, "unknown")
    assert env.inbox.recover() == []
    then = time.time() - env.settings.cluster.lease_s - 1
    os.utime(folder, (then, then))
    (job,) = env.inbox.recover_abandoned()
    assert job.id == folder.name


def test_recording_a_job_twice_returns_the_first(env: Env) -> None:
    new = NewJob(id=uuid.uuid4().hex, name="x", source="x.jsonl", provider="local", request_count=1)
    first = env.store.jobs.insert(new)
    assert env.store.jobs.insert(NewJob(id=new.id, name="other", source="o.jsonl", provider="local")) == first
    rejected = RejectedJob(
        id=uuid.uuid4().hex, name="r", source="r.csv", provider="local", claimed_path="/c", rejected_path="/r",
        report_path="/r.errors.txt", reason="no", finished_at=1000.0,
    )  # fmt: skip
    event = build_event(env.settings, "batch.rejected", {"id": rejected.id}, now=1000.0, job_webhook_url=None)
    once = env.store.jobs.insert_rejected(rejected, [event])
    assert env.store.jobs.insert_rejected(rejected, [event]) == once
    assert len(env.store.deliveries.select(job_id=rejected.id)) == 1


# ---------------------------------------------------------------- files that change while they are taken


def test_a_file_that_grows_while_it_is_read_is_read_again(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    grown: list[bool] = []

    def append_once(*args: Any, **kwargs: Any) -> Any:
        report = validate_stream(*args, **kwargs)
        if not grown:
            grown.append(True)
            claimed = next((env.inbox_dir / ".batchd" / "claimed").glob("*/x.jsonl"))
            with claimed.open("ab") as writer:
                writer.write(request("c"))
        return report

    monkeypatch.setattr("batchd.inbox.validate_stream", append_once)
    env.drop("x.jsonl", GOOD)
    job = env.take("x.jsonl")
    claimed = Path(str(job.claimed_path))
    assert job.request_count == 3 and Path(str(job.upload_path)).read_bytes().count(b"\n") == 3
    assert (job.source_size, job.source_mtime_ns) == (claimed.stat().st_size, claimed.stat().st_mtime_ns)


def test_a_file_that_keeps_changing_is_taken_as_last_read_and_recorded(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def append_each_time(*args: Any, **kwargs: Any) -> Any:
        result = write_upload_copy(*args, **kwargs)
        claimed = next((env.inbox_dir / ".batchd" / "claimed").glob("*/x.jsonl"))
        with claimed.open("ab") as writer:
            writer.write(request(uuid.uuid4().hex[:8]))
        return result

    monkeypatch.setattr("batchd.inbox.write_upload_copy", append_each_time)
    env.drop("x.jsonl", GOOD)
    job = env.take("x.jsonl")
    assert job.state is JobState.RECEIVED
    # Three reads, each a line longer; the job records the last one read.
    assert job.request_count == 4
    assert job.source_size is not None and Path(str(job.claimed_path)).stat().st_size > job.source_size


async def test_the_watcher_tells_a_file_being_written_from_one_closed(env: Env) -> None:
    watcher = InboxWatcher(env.inbox_dir)
    stop = anyio.Event()
    kinds: list[str] = []
    try:
        with (env.inbox_dir / "held.jsonl").open("wb") as writer:
            writer.write(GOOD)
            writer.flush()
            with anyio.fail_after(10):
                while "writing" not in kinds:
                    kinds += [e.kind for e in await watcher.read(timeout=1, stop=stop)]
        with anyio.fail_after(10):
            while "ready" not in kinds:
                kinds += [e.kind for e in await watcher.read(timeout=1, stop=stop)]
    finally:
        watcher.close()
    assert kinds.index("writing") < kinds.index("ready")


# ---------------------------------------------------------------- modes


def test_what_the_inbox_makes_has_explicit_modes(env: Env) -> None:
    old = os.umask(0)
    try:
        env.drop("bad.jsonl", BAD)
        env.drop("x.jsonl", GOOD)
        rejected = env.take("bad.jsonl")
        accepted = env.take("x.jsonl")
    finally:
        os.umask(old)

    def mode(path: str | Path) -> int:
        return stat.S_IMODE(Path(path).stat().st_mode) & 0o777

    assert mode(str(rejected.report_path)) == 0o640
    assert mode(env.inbox_dir / "rejected") == 0o750
    assert mode(Path(str(accepted.claimed_path)).parent) == 0o750
    assert mode(str(accepted.upload_path)) == 0o640
    marker = next(Path(str(accepted.claimed_path)).parent.glob(".claimed-by.*"))
    assert mode(marker) == 0o640 and json.loads(marker.read_text())["daemon"] == env.inbox.claimer
