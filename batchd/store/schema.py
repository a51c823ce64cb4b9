"""The tables of batchd's state and the forward migrations that bring an older database to them.

Times are unix seconds (float), which every dialect stores without time-zone surprises.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    and_,
    inspect,
    or_,
    text,
    update,
)
from sqlalchemy.engine import Dialect

from batchd.models import TERMINAL_STATES, JobState


class OutsideText(TypeDecorator[str]):
    """Text that comes from outside (a spec, a provider's or a receiver's message, a URL).

    PostgreSQL refuses a NUL character in text, which SQLite keeps: a spec's `"model":
    "a\\u0000b"` must not make a job impossible to record. There it is stored as U+FFFD,
    and compared the same way, since parameters go through this type too.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and dialect.name == "postgresql" and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value


metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", Text, nullable=False),
    #: the file name as dropped (NAME.jsonl or NAME.json)
    Column("source", Text, nullable=False),
    Column("state", String(16), nullable=False),
    #: the provider's kind ("together", "anthropic", …: a published field)
    Column("provider", String(16), nullable=False),
    #: which configured provider: "default" ([provider]) or a [providers.NAME] table's NAME
    Column("provider_name", Text, nullable=False, default="default", server_default=text("'default'")),
    Column("endpoint", Text),
    #: the claimed data file under inbox/.batchd/claimed/<id>/
    Column("claimed_path", Text),
    Column("spec_path", Text),
    #: the normalised copy that is uploaded (defines the input order)
    Column("upload_path", Text),
    Column("sha256", String(64)),
    #: 64-bit: PostgreSQL's INTEGER stops at 2 GiB, and a sharded input may be larger
    Column("size_bytes", BigInteger),
    Column("request_count", Integer),
    #: unbounded: a spec's window is only checked for its shape, and PostgreSQL enforces lengths
    Column("completion_window", Text),
    Column("model", OutsideText),
    Column("webhook_url", OutsideText),
    Column("metadata", JSON, nullable=False, default=dict),
    Column("input_file_id", Text),
    Column("outbox_path", Text),
    #: why the job failed or was rejected (the first problems)
    Column("reason", OutsideText),
    Column("report_path", Text),
    Column("rejected_path", Text),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("poll_interval_s", Float),
    Column("next_check_at", Float),
    #: consecutive failed attempts of the current step (drives the backoff)
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", OutsideText),
    Column("request_counts", JSON),
    Column("usage", JSON),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("round", Integer, nullable=False, default=0, server_default="0"),
    #: the daemon working on the job (several daemons on one PostgreSQL); its lease lasts while
    #: the daemon's heartbeat does (store/cluster.py); lease_until records the first lease
    Column("owner", String(32)),
    Column("lease_until", Float),
    #: counts claims: a daemon that lost its lease cannot commit a step it started before
    Column("fence", Integer, nullable=False, default=0, server_default="0"),
    #: the claimed file as the upload copy was made from it: a later change is reported, not lost
    Column("source_size", BigInteger),
    Column("source_mtime_ns", BigInteger),
    #: why the source file no longer matches what was submitted (None: it does, or is unknown)
    Column("source_changed", OutsideText),
    #: failures no step expects (bugs, full disks, a database gone): past a bound the job is parked
    Column("unexpected_failures", Integer, nullable=False, default=0, server_default="0"),
    #: set while the job is parked (taken out of the scheduler until an operator resumes it)
    Column("parked_at", Float),
    Column("parked_reason", OutsideText),
    #: when the scheduler next has something to do for the job; NULL: ended or parked (store/due.py)
    Column("due_at", Float),
    #: admission (#18): the tokens it enqueues (estimated at intake), its place in the queue,
    #: when it was let in, why it waits while queued, its estimated and (once ended) usage cost
    Column("estimated_input_tokens", BigInteger),
    Column("estimated_output_tokens", BigInteger),
    Column("priority", Integer, nullable=False, default=0, server_default="0"),
    Column("admitted_at", Float),
    Column("wait_reason", OutsideText),
    Column("estimated_cost_usd", Float),
    Column("cost_usd", Float),
    #: the provider's `stuck_after_s` when the last round was planned (0 or NULL: the dialect's default)
    Column("stuck_after_s", Float),
    #: when a provider's webhook last said one of the job's batches ended (batchd/hooks): the job is
    #: due then and polled on its own, never left for a list sweep; the poll that follows clears it
    Column("hinted_at", Float),
    #: packing (batchd/packs.py): the pack job whose batches carry a small file's requests; a
    #: pack's number of files (NULL: not a pack)
    Column("pack_id", String(32)),
    Column("pack_members", Integer),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_name", "name"),
)

remote_batches = Table(
    "remote_batches",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), ForeignKey("jobs.id"), nullable=False),
    #: 0 for the first submission; follow-up rounds count up
    Column("round", Integer, nullable=False, default=0),
    Column("shard", Integer, nullable=False, default=0),
    Column("input_file_id", Text, nullable=False),
    #: the provider's batch id; NULL while only the intent to create exists
    Column("remote_id", Text, unique=True),
    #: "creating" until bound, then the normalised remote status
    Column("status", String(16), nullable=False),
    Column("create_attempts", Integer, nullable=False, default=0),
    Column("intent_at", Float, nullable=False),
    Column("remote_created_at", Float),
    Column("output_file_id", Text),
    Column("error_file_id", Text),
    Column("error", OutsideText),
    Column("progress", Float),
    Column("updated_at", Float, nullable=False),
    Column("input_path", Text),
    Column("request_count", Integer),
    Column("size_bytes", BigInteger),
    Column("sha256", String(64)),
    #: when batchd last saw the batch move (bound, a new status, more answered): the stuck clock
    Column("progress_at", Float),
    #: the requests the provider says it answered so far (completed + failed), when it counts them
    Column("answered", Integer),
    #: when batchd found the batch stuck and set out to cancel it (NULL: never)
    Column("stuck_at", Float),
    #: when the provider stops keeping its results (its answer, else the dialect's retention)
    Column("results_expire_at", Float),
    #: what became of its files at the provider: {"input" | "output" | "errors" | "batch":
    #: "downloaded" | "deleted" | "refused" | "expired"} (models.FileKind, models.FileFate)
    Column("provider_files", JSON),
    Index("ix_remote_batches_job", "job_id"),
)

events = Table(
    "events",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("job_id", String(32), ForeignKey("jobs.id")),
    Column("type", String(32), nullable=False),
    #: the exact body bytes, sent identically on every attempt
    Column("body", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(40), ForeignKey("events.id"), nullable=False),
    Column("url", OutsideText, nullable=False),
    #: which secrets sign it: "config" (the [[webhooks]] entry with this url) or "inbox"
    Column("secret_ref", String(16), nullable=False),
    #: a models.DeliveryState value: pending | delivered | dead | disabled
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_status", Integer),
    Column("last_error", OutsideText),
    Column("delivered_at", Float),
    #: the daemon sending it, until lease_until: one sender at a time, another after a crash
    Column("owner", String(32)),
    Column("lease_until", Float),
    Index("ix_deliveries_due", "state", "next_attempt_at"),
)

daemons = Table(
    "daemons",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    #: host and state directory: a daemon restarted there is the same daemon's successor
    Column("home", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stopped_at", Float),
)

#: One counter per loop that a command can have work for (store/signals.py): a command bumps it in
#: the transaction that makes the work, each daemon reads the few rows a few times a second.
signals = Table(
    "signals",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)

endpoints = Table(
    "endpoints",
    metadata,
    Column("url", OutsideText, primary_key=True),
    Column("disabled_at", Float),
    Column("reason", OutsideText),
)


#: Two jobs never share an outbox folder: the reservation is the unique value.
outbox_unique = Index("ux_jobs_outbox_path", jobs.c.outbox_path, unique=True)
#: "What is due now" for one daemon, and when its next job falls due, without reading the rest.
due_index = Index("ix_jobs_due", jobs.c.owner, jobs.c.due_at)
#: The status page's newest jobs, of all states or of one (store/views.py), without sorting them all.
newest_indexes = (
    Index("ix_jobs_created", jobs.c.created_at),
    Index("ix_jobs_state_created", jobs.c.state, jobs.c.created_at),
)


#: Admission (#18): each provider's queue in its order, without sorting every waiting job; and
#: the jobs let in since a day or month began (a spend budget), without reading older ones.
admission_indexes = (
    Index("ix_jobs_queue", jobs.c.provider_name, jobs.c.state, jobs.c.priority, jobs.c.created_at),
    Index("ix_jobs_admitted", jobs.c.admitted_at),
)


#: What a migration step returns when the live jobs' due times must be set again once every step
#: has run (store/due.py reads the whole current row: before the last step, a column of a later
#: step would be missing).
REFRESH_DUE = True


#: A pack's files, read when its round ends (daemon/finish.py) and when one is cancelled.
pack_index = Index("ix_jobs_pack", jobs.c.pack_id)


def waiting_in_pack(pack_id: str) -> ColumnElement[bool]:
    """(SQL) The files still waiting in a pack: not ended, not gone on alone with a round of their own."""
    return and_(jobs.c.pack_id == pack_id, jobs.c.round == 0, jobs.c.state.in_(LIVE_STATES))


#: (SQL) Jobs that are not waiting in a pack: the jobs admission, claims and the queue reckon with
#: (a file in a pack mirrors its pack's state; the pack is the one that holds room).
not_in_pack = or_(jobs.c.pack_id.is_(None), jobs.c.round > 0)


def _migrate_v1(conn: Connection) -> None:
    # A new database gets the current schema at once; the later steps then find nothing to do.
    metadata.create_all(conn)


def _migrate_v2(conn: Connection) -> None:
    outbox_unique.create(conn, checkfirst=True)


def _add_column(conn: Connection, table: Table, name: str) -> None:
    """ALTER TABLE … ADD COLUMN for a column declared above, unless it is there already."""
    if name in {c["name"] for c in inspect(conn).get_columns(table.name)}:
        return
    column = table.c[name]
    ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} {column.type.compile(dialect=conn.dialect)}"
    if column.server_default is not None:
        ddl += f" NOT NULL DEFAULT {column.server_default.arg}"  # type: ignore[attr-defined]
    conn.exec_driver_sql(ddl)


def _migrate_v3(conn: Connection) -> None:
    # Shards and follow-up rounds: a job's round, each remote batch's own input file.
    _add_column(conn, jobs, "round")
    for name in ("input_path", "request_count", "size_bytes", "sha256"):
        _add_column(conn, remote_batches, name)


def _migrate_v4(conn: Connection) -> None:
    # Leases: several daemons sharing one PostgreSQL database.
    for name in ("owner", "lease_until", "fence"):
        _add_column(conn, jobs, name)
    for name in ("owner", "lease_until"):
        _add_column(conn, deliveries, name)
    daemons.create(conn, checkfirst=True)


def _migrate_v5(conn: Connection) -> None:
    # Hardening: the source file as submitted, and jobs parked after repeated unexpected failures.
    for name in (
        "source_size",
        "source_mtime_ns",
        "source_changed",
        "unexpected_failures",
        "parked_at",
        "parked_reason",
    ):
        _add_column(conn, jobs, name)


def _migrate_v6(conn: Connection) -> bool:
    # The due-driven scheduler: each job's next due time, kept by every write from now on (set
    # for the live jobs once every step has run: REFRESH_DUE).
    # (Imported here: signals.py builds on these tables.)
    from batchd.store.signals import create_rows

    _add_column(conn, jobs, "due_at")
    due_index.create(conn, checkfirst=True)
    # ...and the counters through which commands wake the daemons (store/signals.py).
    signals.create(conn, checkfirst=True)
    create_rows(conn)
    return REFRESH_DUE


def _migrate_v7(conn: Connection) -> None:
    # Several providers behind one inbox: each job's configured provider ([provider] is "default").
    _add_column(conn, jobs, "provider_name")


def _migrate_v8(conn: Connection) -> None:
    # The status page reads the newest jobs a page at a time.
    for index in newest_indexes:
        index.create(conn, checkfirst=True)


def _migrate_v9(conn: Connection) -> None:
    # Admission control and spend budgets (#18).
    for name in (
        "estimated_input_tokens",
        "estimated_output_tokens",
        "priority",
        "admitted_at",
        "wait_reason",
        "estimated_cost_usd",
        "cost_usd",
    ):
        _add_column(conn, jobs, name)
    for index in admission_indexes:
        index.create(conn, checkfirst=True)


def _migrate_v10(conn: Connection) -> bool:
    # Stuck batches (#18): when each batch last moved, whether batchd cancelled it as stuck, and the
    # limit its job was planned under. A batch bound before starts its stuck clock at its last
    # write (a poll), so an upgrade never cancels at once what nobody watched move.
    _add_column(conn, jobs, "stuck_after_s")
    for name in ("progress_at", "answered", "stuck_at"):
        _add_column(conn, remote_batches, name)
    conn.execute(
        update(remote_batches)
        .where(remote_batches.c.progress_at.is_(None), remote_batches.c.remote_id.is_not(None))
        .values(progress_at=remote_batches.c.updated_at)
    )
    # Each live job's due time now also counts its batches' stuck deadlines.
    return REFRESH_DUE


def _migrate_v11(conn: Connection) -> None:
    # Provider webhooks as poll hints: the job a hint made due, until its poll.
    _add_column(conn, jobs, "hinted_at")


def _migrate_v12(conn: Connection) -> None:
    # Retention (#18): when each batch's results expire, and what became of its provider files.
    for name in ("results_expire_at", "provider_files"):
        _add_column(conn, remote_batches, name)


def _migrate_v13(conn: Connection) -> None:
    # Packing: small files share remote batches, carried by a pack job.
    for name in ("pack_id", "pack_members"):
        _add_column(conn, jobs, name)
    pack_index.create(conn, checkfirst=True)


#: Forward migrations, in order; each runs once, in its own transaction. Each later step brings a
#: database made by an older release to the current schema and checks first, so on a database
#: step 1 just created it does nothing.
MIGRATIONS: tuple[tuple[int, Any], ...] = (
    (1, _migrate_v1),
    (2, _migrate_v2),
    (3, _migrate_v3),
    (4, _migrate_v4),
    (5, _migrate_v5),
    (6, _migrate_v6),
    (7, _migrate_v7),
    (8, _migrate_v8),
    (9, _migrate_v9),
    (10, _migrate_v10),
    (11, _migrate_v11),
    (12, _migrate_v12),
    (13, _migrate_v13),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

#: The `state` values of jobs not yet ended: what the scheduler, the leases and the heartbeat read.
LIVE_STATES = [s.value for s in JobState if s not in TERMINAL_STATES]

#: PostgreSQL advisory lock held while migrating (any constant; "batchd" in ASCII), so that daemons
#: starting together on one database migrate one after the other.
MIGRATION_LOCK = 0x626174636864
