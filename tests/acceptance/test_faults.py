"""The disk fills up and the database goes read-only under a running daemon (DESIGN §10): it stays
up, `/healthz` says why, and every file completes soon after the fault clears, without a restart.

The faults are real: the state folder (inbox, outbox, SQLite database) is a small tmpfs that
the test fills; a PostgreSQL database is made read-only with `default_transaction_read_only`.
Mounting needs root (CI's machine runs the tests as root).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.acceptance.conftest import DaemonProcess, Harness, chat, eventually, harness
from tests.databases import ADMIN_URL, ON_CI, POSTGRESQL

pytestmark = pytest.mark.each_database

#: The tmpfs the state lives on: room for the database, the inbox and the outbox of a few jobs.
TMPFS_SIZE = "24m"
#: "within a minute of the fault clearing"
RECOVERY_S = 60.0


def _mount(where: Path, *options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=" + TMPFS_SIZE, *options)), "tmpfs", str(where)],
                   check=True, capture_output=True)  # fmt: skip


@asynccontextmanager
async def on_tmpfs(tmp_path: Path) -> AsyncIterator[Harness]:
    """A harness whose state folder is a tmpfs of its own (unmounted at the end)."""
    async with harness(tmp_path) as h:
        state = h.ws.root / "state"
        state.mkdir()
        try:
            _mount(state)
        except (OSError, subprocess.CalledProcessError) as exc:
            if ON_CI:
                raise
            pytest.skip(f"cannot mount a tmpfs here (root needed): {exc}")
        with h.ws.config.open("a", encoding="utf-8") as config:
            config.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        try:
            yield h
        finally:
            for daemon in h.daemons:
                daemon.kill()
            await anyio.run_process(["umount", "-l", str(state)], check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem under `folder` to the last byte; return the filler file."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 1 << 20
        while size >= 1:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                size //= 2
    finally:
        os.close(fd)
    return filler


async def healthz(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    (listening,) = daemon.logs_named("metrics.listening")
    async with httpx.AsyncClient() as http:
        response = await http.get(str(listening["healthz"]), timeout=10)
    report: dict[str, Any] = response.json()
    return response.status_code, report


async def failing_with(daemon: DaemonProcess, *words: str) -> dict[str, Any]:
    """Wait until /healthz answers 503 with one of `words` in its faults; return the report."""
    found: dict[str, Any] = {}

    async def check() -> bool:
        code, report = await healthz(daemon)
        found.update(report)
        said = json.dumps(report["faults"]) + str(report["database"])
        return code == 503 and any(word in said for word in words)

    for _ in range(600):  # a minute at most
        if daemon.proc.poll() is not None:
            raise AssertionError(f"the daemon exited: {daemon.log_path.read_text()}")
        if await check():
            return found
        await anyio.sleep(0.1)
    raise AssertionError(f"/healthz never said any of {words!r}: {found}")


def done(h: Harness, name: str) -> dict[str, Any] | None:
    path = h.ws.outbox / name / "job.json"
    if not path.is_file():
        return None
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


async def test_a_full_disk_mid_run_is_waited_out_and_every_file_completes(tmp_path: Path) -> None:
    async with on_tmpfs(tmp_path) as h:
        await h.emulator.control("POST", "pause")
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        h.ws.drop("mid.jsonl", [chat("a"), chat("b")])
        await daemon.until_logged("job.batch_created", timeout=60)
        filler = fill(h.ws.root / "state")
        await h.emulator.control("POST", "resume")  # the results come back to a full disk

        # The database says "database or disk is full", a file write ENOSPC: whichever comes first.
        report = await failing_with(daemon, "ENOSPC", "is full")
        assert report["status"] == "failing"
        assert done(h, "mid") is None and daemon.proc.poll() is None

        filler.unlink()
        await eventually(lambda: done(h, "mid") is not None, RECOVERY_S)
        finished = done(h, "mid")
        assert finished is not None and finished["status"] == "completed"
        assert finished["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
        # New work is taken as before, and /healthz is well again once the work succeeds.
        h.ws.drop("after.jsonl", [chat("c")])
        await eventually(lambda: done(h, "after") is not None, RECOVERY_S)
        code, report = await healthz(daemon)
        assert code == 200 and report["faults"] == {}, report
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0


def _set_read_only(h: Harness, read_only: bool) -> None:
    """Make the PostgreSQL database refuse writes (or take them again) under the running daemon."""
    name = make_url(h.ws.database_url).database
    admin = create_engine(ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            value = "on" if read_only else "off"
            conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}'))
            # Sessions read the setting when they start: end the daemon's open ones.
            others = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            conn.execute(text(others + " AND pid <> pg_backend_pid()"), {"n": name})
    finally:
        admin.dispose()


# A SQLite file cannot be made read-only under a process that holds it open (a remount is refused
# while files are open for writing; permissions do not stop root): its write failures are the
# full disk's above ("database or disk is full").
@pytest.mark.each_database(POSTGRESQL)
async def test_a_database_made_read_only_mid_run_is_waited_out(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        with h.ws.config.open("a", encoding="utf-8") as config:
            config.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        await h.emulator.control("POST", "pause")
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        h.ws.drop("ro.jsonl", [chat("a")])
        await daemon.until_logged("job.batch_created", timeout=60)
        _set_read_only(h, True)
        try:
            await h.emulator.control("POST", "resume")
            report = await failing_with(daemon, "read-only")
            assert report["status"] == "failing"
            assert done(h, "ro") is None and daemon.proc.poll() is None
        finally:
            _set_read_only(h, False)
        await eventually(lambda: done(h, "ro") is not None, RECOVERY_S)
        finished = done(h, "ro")
        assert finished is not None and finished["status"] == "completed"
        h.ws.drop("after.jsonl", [chat("b")])
        await eventually(lambda: done(h, "after") is not None, RECOVERY_S)
        assert daemon.proc.poll() is None
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0


async def test_a_full_disk_at_intake_is_waited_out_and_the_file_is_taken(tmp_path: Path) -> None:
    async with on_tmpfs(tmp_path) as h:
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        # Written before the disk fills (the producer protocol's temp name), renamed in after.
        staged = h.ws.inbox / ".in.jsonl.tmp"
        staged.write_text("".join(json.dumps(chat(f"r{i}")) + "\n" for i in range(3)), encoding="utf-8")
        filler = fill(h.ws.root / "state")
        os.rename(staged, h.ws.inbox / "in.jsonl")

        report = await failing_with(daemon, "ENOSPC", "is full")
        assert report["status"] == "failing" and daemon.proc.poll() is None
        assert done(h, "in") is None

        filler.unlink()
        await eventually(lambda: done(h, "in") is not None, RECOVERY_S)
        finished = done(h, "in")
        assert finished is not None and finished["status"] == "completed"
        assert finished["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0
