"""Telling outside faults from bugs, and the picture of what fails now."""

from __future__ import annotations

import errno
import sqlite3

from sqlalchemy.exc import OperationalError

from batchd.faults import Faults, Kind, classify, describe
from batchd.providers.errors import ProviderError
from batchd.store import StoreUnavailable


def test_each_failure_has_its_kind() -> None:
    assert classify(ProviderError("429", retryable=True)) is Kind.PROVIDER
    assert classify(OperationalError("UPDATE", None, sqlite3.OperationalError("database is locked"))) is Kind.DATABASE
    assert classify(StoreUnavailable("down")) is Kind.DATABASE
    assert classify(sqlite3.OperationalError("disk I/O error")) is Kind.DATABASE
    assert classify(OSError(errno.ENOSPC, "No space left on device")) is Kind.DISK
    assert classify(KeyError("x")) is Kind.UNEXPECTED
    assert classify(OverflowError("math range error")) is Kind.UNEXPECTED


def test_a_group_is_as_serious_as_its_worst_member() -> None:
    disk = OSError(errno.EIO, "Input/output error")
    assert classify(ExceptionGroup("shards", [ProviderError("503"), disk])) is Kind.DISK
    assert classify(ExceptionGroup("shards", [disk, ValueError("bug")])) is Kind.UNEXPECTED
    assert classify(ExceptionGroup("shards", [ProviderError("503")])) is Kind.PROVIDER


def test_a_disk_error_is_described_with_its_errno_and_file() -> None:
    exc = OSError(errno.ENOSPC, "No space left on device", "/var/lib/batchd/outbox/x/output.jsonl")
    assert describe(exc) == "No space left on device (ENOSPC): /var/lib/batchd/outbox/x/output.jsonl"
    assert describe(RuntimeError("first line\nsecond")) == "RuntimeError: first line"


def test_a_fault_is_reported_once_per_reason_and_cleared_by_success() -> None:
    now = [100.0]
    faults = Faults(clock=lambda: now[0])
    assert faults.summary() == "" and faults.current() == {}
    full = OSError(errno.ENOSPC, "No space left on device")
    faults.report("intake", full)
    faults.report("intake", full)  # the same reason: no second log line, the same start
    faults.report("steps", OperationalError("x", None, sqlite3.OperationalError("readonly database")))
    assert faults.current() == {
        "intake": "disk: No space left on device (ENOSPC)",
        "steps": "database: OperationalError: (sqlite3.OperationalError) readonly database",
    }
    assert faults.summary().startswith("failing: intake (disk: No space left on device (ENOSPC)); steps (")
    now[0] = 130.0
    faults.clear("intake")
    faults.clear("scheduler")  # never failed: nothing to say
    assert list(faults.current()) == ["steps"]
