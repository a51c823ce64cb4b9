"""The durable state of batchd: SQLAlchemy 2.x Core tables and the Store.

This is the only module that speaks SQL. Every method is one transaction, so a
state transition and the webhook events it causes commit together or not at
all (the transactional outbox of DESIGN §2). Times are unix seconds (float),
which every dialect stores without time-zone surprises.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    RowMapping,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry

from batchd.models import (
    PENDING,
    TERMINAL_STATES,
    Delivery,
    EndpointStats,
    Job,
    JobState,
    NewEvent,
    RemoteBatchRecord,
    StoredEvent,
)


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
    Column("provider", String(16), nullable=False),
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
    #: the daemon working on the job, until lease_until (several daemons on one PostgreSQL)
    Column("owner", String(32)),
    Column("lease_until", Float),
    #: counts claims: a daemon that lost its lease cannot commit a step it started before
    Column("fence", Integer, nullable=False, default=0, server_default="0"),
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
    #: pending | delivered | dead | disabled
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

endpoints = Table(
    "endpoints",
    metadata,
    Column("url", OutsideText, primary_key=True),
    Column("disabled_at", Float),
    Column("reason", OutsideText),
)


#: Two jobs never share an outbox folder: the reservation is the unique value.
outbox_unique = Index("ux_jobs_outbox_path", jobs.c.outbox_path, unique=True)


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


#: Forward migrations, in order; each runs once, in its own transaction. Each later step brings a
#: database made by an older release to the current schema and checks first, so on a database
#: step 1 just created it does nothing.
MIGRATIONS: tuple[tuple[int, Any], ...] = (
    (1, _migrate_v1),
    (2, _migrate_v2),
    (3, _migrate_v3),
    (4, _migrate_v4),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

#: The `state` values of jobs not yet ended: what the scheduler, the leases and the heartbeat read.
LIVE_STATES = [s.value for s in JobState if s not in TERMINAL_STATES]

#: PostgreSQL advisory lock held while migrating (any constant; "batchd" in ASCII), so that daemons
#: starting together on one database migrate one after the other.
_MIGRATION_LOCK = 0x626174636864


class StaleState(Exception):
    """A transition expected a state the job is no longer in (or a lease this daemon lost)."""


class StoreUnavailable(Exception):
    """The database cannot be opened or brought to this batchd's schema (said without the password)."""


def safe_url(url: str) -> str:
    """A database URL without its password, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class Lease:
    """Which jobs a piece of daemon work holds, and at which claim (fence) of each."""

    owner: str
    fences: Mapping[str, int]


#: The lease of the work running in this context (a daemon step, a poll round). Set, every write
#: to one of those jobs first checks, in its own transaction and with the job row locked, that the
#: job is still this owner's at that fence: a daemon that lost a job to another cannot write to it.
#: Unset (the CLI, tests, a single daemon's recovery), writes are not fenced.
LEASE: ContextVar[Lease | None] = ContextVar("batchd_lease", default=None)


class Store:
    """Jobs, remote batches and webhook events in one SQL database."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self._engine = _make_engine(url)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def now(self) -> float:
        return float(self._clock())

    # ------------------------------------------------------------ plumbing

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        # BEGIN IMMEDIATE on SQLite: take the write lock up front, so two writers
        # queue on busy_timeout instead of failing half-way with "database is locked".
        with self._engine.connect().execution_options(batchd_write=True) as conn, conn.begin():
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    # ------------------------------------------------------------ schema

    def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION; return the version found before.

        Raises StoreUnavailable when the server cannot be reached or the file cannot be opened,
        and when the schema is newer than this batchd knows: start-up stops with a message then.
        """
        try:
            return self._migrate()
        except OperationalError as exc:
            raise StoreUnavailable(f"cannot open the database {safe_url(self.url)}: {exc.orig or exc}") from exc

    def _migrate(self) -> int:
        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                # DDL is transactional there and writers do not queue as SQLite's BEGIN IMMEDIATE
                # makes them: without the lock, two daemons would both find no table and both
                # create it. The lock is released with the transaction.
                conn.execute(select(func.pg_advisory_xact_lock(literal(_MIGRATION_LOCK, BigInteger))))
            metadata.tables["schema_version"].create(conn, checkfirst=True)
            found = conn.execute(select(func.max(schema_version.c.version))).scalar()
            current = int(found or 0)
            if current > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"the database {safe_url(self.url)} has schema version {current}, newer than this"
                    f" batchd knows ({SCHEMA_VERSION}): upgrade batchd"
                )
            for version, step in MIGRATIONS:
                if version > current:
                    step(conn)
                    conn.execute(schema_version.delete())
                    conn.execute(insert(schema_version).values(version=version))
        return current

    def has_schema(self) -> bool:
        """Whether batchd's tables exist: a new database (or a new SQLite file) has none until migrate()."""
        with self._engine.connect() as conn:
            return inspect(conn).has_table(schema_version.name)

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 0)

    def probe_write(self) -> None:
        """A write transaction that changes nothing: raises when the database cannot take a write (/healthz)."""
        with self._write() as conn:
            conn.execute(update(schema_version).values(version=schema_version.c.version))

    # ------------------------------------------------------------ leases

    def _fenced(self, conn: Connection, job_ids: Collection[str]) -> set[str]:
        """The jobs among `job_ids` the current LEASE may write (all of them without a lease).

        The rows are locked (FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE already
        excludes every other writer) so no claim can slip in before this transaction commits.
        """
        lease = LEASE.get()
        if lease is None:
            return set(job_ids)
        rows = conn.execute(
            select(jobs.c.id, jobs.c.owner, jobs.c.fence).where(jobs.c.id.in_(list(job_ids))).with_for_update()
        ).all()
        return {str(i) for i, owner, fence in rows if owner == lease.owner and fence == lease.fences.get(str(i))}

    def _guard(self, conn: Connection, job_id: str) -> None:
        if job_id not in self._fenced(conn, [job_id]):
            raise StaleState(f"job {job_id} is no longer held by this daemon (its lease was lost)")

    def register_daemon(self, daemon_id: str, *, host: str, pid: int, home: str) -> list[str]:
        """Record a starting daemon; return the ids of earlier daemons with the same `home`.

        `home` is host and state directory: the state lock proves those earlier daemons
        dead, so their jobs may be taken over at once rather than when their leases end.
        """
        now = self.now()
        with self._write() as conn:
            earlier = [
                str(r[0])
                for r in conn.execute(select(daemons.c.id).where(daemons.c.home == home, daemons.c.id != daemon_id))
            ]
            conn.execute(
                insert(daemons).values(id=daemon_id, host=host, pid=pid, home=home, started_at=now, heartbeat_at=now)
            )
            if earlier:
                conn.execute(
                    update(daemons)
                    .where(daemons.c.id.in_(earlier), daemons.c.stopped_at.is_(None))
                    .values(stopped_at=now)
                )
                # Their deliveries too: a delivery cut short by the crash goes out again at once.
                conn.execute(
                    update(deliveries).where(deliveries.c.owner.in_(earlier)).values(owner=None, lease_until=None)
                )
        return earlier

    def renew_leases(self, owner: str, lease_s: float) -> dict[str, int]:
        """Heartbeat: extend this daemon's leases; return the active jobs it still holds (id → fence)."""
        now = self.now()
        held = (jobs.c.owner == owner, jobs.c.state.in_(LIVE_STATES))
        with self._write() as conn:
            conn.execute(update(daemons).where(daemons.c.id == owner).values(heartbeat_at=now))
            conn.execute(update(jobs).where(*held).values(lease_until=now + lease_s))
            rows = conn.execute(select(jobs.c.id, jobs.c.fence).where(*held))
            return {str(i): int(f) for i, f in rows}

    def claim_jobs(
        self, owner: str, lease_s: float, *, limit: int, dead_owners: Collection[str] = ()
    ) -> dict[str, int]:
        """Take up to `limit` active jobs nobody holds (no owner, an expired lease, or a dead
        owner's); return them (id → fence). SKIP LOCKED: daemons claiming at once never wait
        on each other or take the same job."""
        now = self.now()
        free = or_(jobs.c.owner.is_(None), jobs.c.lease_until < now)
        if dead_owners:
            free = or_(free, jobs.c.owner.in_(list(dead_owners)))
        with self._write() as conn:
            ids = [
                str(r[0])
                for r in conn.execute(
                    select(jobs.c.id)
                    .where(jobs.c.state.in_(LIVE_STATES), free, or_(jobs.c.owner.is_(None), jobs.c.owner != owner))
                    .order_by(jobs.c.created_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ]
            if not ids:
                return {}
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids))
                .values(owner=owner, lease_until=now + lease_s, fence=jobs.c.fence + 1)
            )
            rows = conn.execute(select(jobs.c.id, jobs.c.fence).where(jobs.c.id.in_(ids)))
            return {str(i): int(f) for i, f in rows}

    def release_jobs(self, owner: str) -> None:
        """A daemon stopping cleanly: its jobs are free for any daemon at once."""
        now = self.now()
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.owner == owner).values(owner=None, lease_until=None))
            conn.execute(update(deliveries).where(deliveries.c.owner == owner).values(owner=None, lease_until=None))
            conn.execute(update(daemons).where(daemons.c.id == owner).values(stopped_at=now))

    def list_daemons(self) -> list[dict[str, Any]]:
        """Every daemon that ever ran on this database, newest first, with the jobs it holds."""
        held = (
            select(func.count())
            .select_from(jobs)
            .where(jobs.c.owner == daemons.c.id, jobs.c.state.in_(LIVE_STATES))
            .scalar_subquery()
        )
        with self._read() as conn:
            rows = conn.execute(select(daemons, held.label("jobs")).order_by(daemons.c.started_at.desc())).all()
        return [dict(r._mapping) for r in rows]

    # ------------------------------------------------------------ jobs

    def insert_job(self, *, events_: Sequence[NewEvent] = (), **values: Any) -> Job:
        """Insert a job (state given in values) and, in the same transaction, its events."""
        now = self.now()
        values = {"created_at": now, "updated_at": now, "metadata": {}, **values}
        with self._write() as conn:
            conn.execute(insert(jobs).values(**_db_values(values)))
            self._insert_events(conn, values["id"], events_, now)
            row = conn.execute(select(jobs).where(jobs.c.id == values["id"])).one()
        return _job(row._mapping)

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return _job(row._mapping) if row else None

    def job_ids(self) -> set[str]:
        """Every job id, for matching against claim folders in one query."""
        with self._read() as conn:
            return {str(r[0]) for r in conn.execute(select(jobs.c.id)).all()}

    def job_exists(self, job_id: str) -> bool:
        return self.get_job(job_id) is not None

    def find_jobs(self, ref: str) -> list[Job]:
        """Jobs matching an id, a unique id prefix, or a name (newest first)."""
        with self._read() as conn:
            exact = conn.execute(select(jobs).where(jobs.c.id == ref)).first()
            if exact:
                return [_job(exact._mapping)]
            # Ids are lower-case hex: SQLite's LIKE ignores case and PostgreSQL's does not, so the
            # prefix is lowered to find the same jobs on both.
            rows = conn.execute(
                select(jobs)
                .where(or_(jobs.c.id.startswith(ref.lower(), autoescape=True), jobs.c.name == ref))
                .order_by(jobs.c.created_at.desc())
            ).all()
        return [_job(r._mapping) for r in rows]

    def list_jobs(self, states: Sequence[JobState] | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.created_at, jobs.c.id)
        if states:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        with self._read() as conn:
            return [_job(r._mapping) for r in conn.execute(query)]

    def active_jobs(self, owner: str | None = None, *, known: Mapping[str, Job] | None = None) -> list[Job]:
        """Every job not yet in a terminal state (with `owner`: only those that daemon holds).

        `known`: the jobs an earlier read returned; one that has not changed since comes back as
        that same object. The scheduler reads every tick while its poll rounds still hold the
        last tick's jobs: so it keeps one copy of each job in memory, not one per tick in flight.
        """
        query = select(jobs).where(jobs.c.state.in_(LIVE_STATES)).order_by(jobs.c.created_at, jobs.c.id)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        with self._read() as conn:
            # Row by row, not .all(): the raw rows of 10,000 jobs are not held beside the jobs.
            return [_unchanged(_job(r._mapping), known) for r in conn.execute(query)]

    def update_job(
        self,
        job_id: str,
        *,
        expect: JobState | Sequence[JobState] | None = None,
        events_: Sequence[NewEvent] = (),
        **values: Any,
    ) -> Job:
        """Change a job (and insert events) in one transaction.

        With `expect`, the change applies only if the job is still in one of
        those states; otherwise StaleState is raised and nothing changes.
        """
        now = self.now()
        values["updated_at"] = now
        if isinstance(values.get("state"), JobState) and values["state"].terminal:
            values.setdefault("finished_at", now)
        query = update(jobs).where(jobs.c.id == job_id).values(**_db_values(values))
        if expect is not None:
            expected = [expect] if isinstance(expect, JobState) else list(expect)
            query = query.where(jobs.c.state.in_([s.value for s in expected]))
        with self._write() as conn:
            self._guard(conn, job_id)
            if conn.execute(query).rowcount != 1:
                raise StaleState(f"job {job_id} is not in state {expect}")
            self._insert_events(conn, job_id, events_, now)
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
        return _job(row._mapping)

    def reserve_outbox(self, job_id: str, candidates: Sequence[Path], taken: Callable[[Path], bool]) -> Path:
        """Record the job's outbox folder before it is created: the first candidate that no other
        job holds and that `taken` (a look at the disk) does not report in use.

        Reserving first and creating second means a crash in between leaves a reservation
        (the restart creates the folder), never an orphan folder nobody owns.
        """
        with self._write() as conn:
            self._guard(conn, job_id)
            current = conn.execute(select(jobs.c.outbox_path).where(jobs.c.id == job_id)).scalar()
            if current:
                return Path(current)
            held = {
                str(p)
                for (p,) in conn.execute(
                    select(jobs.c.outbox_path).where(jobs.c.outbox_path.in_([str(c) for c in candidates]))
                ).all()
            }
            for candidate in candidates:
                if str(candidate) in held or taken(candidate):
                    continue
                # On SQLite BEGIN IMMEDIATE keeps everyone else out since `held` was read. On
                # PostgreSQL another transaction may take this name meanwhile: the unique index
                # refuses the second (hence a savepoint, to try the next name), and a reservation
                # of this same job made meanwhile is kept (hence `outbox_path IS NULL`).
                try:
                    with conn.begin_nested():
                        reserved = conn.execute(
                            update(jobs)
                            .where(jobs.c.id == job_id, jobs.c.outbox_path.is_(None))
                            .values(outbox_path=str(candidate), updated_at=self.now())
                        ).rowcount
                except IntegrityError:
                    continue
                if reserved != 1:
                    current = conn.execute(select(jobs.c.outbox_path).where(jobs.c.id == job_id)).scalar()
                    if current is None:
                        raise StaleState(f"job {job_id} does not exist")
                    return Path(current)
                return candidate
        raise FileExistsError(f"every outbox folder name for job {job_id} is taken: {[str(c) for c in candidates]}")

    def counts_by_state(self) -> dict[str, int]:
        with self._read() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {str(state): int(n) for state, n in rows}

    # ------------------------------------------------------------ remote batches

    def plan_round(
        self, job_id: str, *, expect: JobState, round_: int, shards: Sequence[Mapping[str, Any]], **job_values: Any
    ) -> list[RemoteBatchRecord]:
        """Commit a round's shards (status "pending") and the job's change, in one transaction.

        Each shard mapping holds `input_path`, `request_count`, `size_bytes`, `sha256`.
        Applies only while the job is still in `expect` (else StaleState), so a
        repeated step never plans a round twice.
        """
        now = self.now()
        values = {**job_values, "round": round_, "updated_at": now}
        with self._write() as conn:
            self._guard(conn, job_id)
            changed = conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state == expect.value).values(**_db_values(values))
            ).rowcount
            if changed != 1:
                raise StaleState(f"job {job_id} is not in state {expect}")
            for index, shard in enumerate(shards):
                conn.execute(
                    insert(remote_batches).values(
                        job_id=job_id,
                        round=round_,
                        shard=index,
                        input_file_id="",
                        status=PENDING,
                        create_attempts=0,
                        intent_at=now,
                        updated_at=now,
                        **shard,
                    )
                )
            rows = conn.execute(
                select(remote_batches)
                .where(remote_batches.c.job_id == job_id, remote_batches.c.round == round_)
                .order_by(remote_batches.c.shard)
            ).all()
        return [_remote(r._mapping) for r in rows]

    def remote_batches(self, job_id: str) -> list[RemoteBatchRecord]:
        with self._read() as conn:
            rows = conn.execute(
                select(remote_batches)
                .where(remote_batches.c.job_id == job_id)
                .order_by(remote_batches.c.round, remote_batches.c.shard, remote_batches.c.id)
            ).all()
        return [_remote(r._mapping) for r in rows]

    def update_remote(
        self,
        record_id: int,
        *,
        expect: Mapping[str, Any] | None = None,
        job_values: Mapping[str, Any] | None = None,
        events_: Sequence[NewEvent] = (),
        **values: Any,
    ) -> RemoteBatchRecord:
        """Change a remote batch and, in the same transaction, its job.

        `expect` maps columns to the values they must still hold (a compare-and-set:
        e.g. the create attempt count, so two racing creates cannot both proceed);
        otherwise StaleState is raised and nothing changes.
        """
        now = self.now()
        values["updated_at"] = now
        query = update(remote_batches).where(remote_batches.c.id == record_id).values(**values)
        for column, value in (expect or {}).items():
            col = remote_batches.c[column]
            query = query.where(col.is_(None) if value is None else col == value)
        with self._write() as conn:
            if conn.execute(query).rowcount != 1:
                raise StaleState(f"remote batch {record_id} changed meanwhile (expected {expect})")
            row = conn.execute(select(remote_batches).where(remote_batches.c.id == record_id)).one()
            self._guard(conn, row.job_id)
            if job_values:
                changes = {**job_values, "updated_at": now}
                conn.execute(update(jobs).where(jobs.c.id == row.job_id).values(**_db_values(changes)))
                self._insert_events(conn, row.job_id, events_, now)
        return _remote(row._mapping)

    def update_remotes(
        self, changes: Sequence[tuple[int, str, Mapping[str, Any], Mapping[str, Any]]], *, chunk: int = 500
    ) -> None:
        """Many `(remote batch id, job id, remote values, job values)` updates, `chunk` per transaction.

        For a poll sweep's answers that change no status: one fsync per chunk instead of one per
        job, and the write lock is never held for long.
        """
        for start in range(0, len(changes), chunk):
            now = self.now()
            with self._write() as conn:
                part = changes[start : start + chunk]
                allowed = self._fenced(conn, {job_id for _, job_id, _, _ in part})
                for record_id, job_id, values, job_values in part:
                    if job_id not in allowed:
                        continue  # taken over by another daemon meanwhile
                    conn.execute(
                        update(remote_batches).where(remote_batches.c.id == record_id).values(**values, updated_at=now)
                    )
                    conn.execute(
                        update(jobs).where(jobs.c.id == job_id).values(**_db_values({**job_values, "updated_at": now}))
                    )

    def active_remote_batches(
        self, *, known: Mapping[int, RemoteBatchRecord] | None = None
    ) -> dict[str, list[RemoteBatchRecord]]:
        """The remote batches of every non-terminal job, by job id (one query per scheduler tick).

        `known` by row id, as in active_jobs.
        """
        query = (
            select(remote_batches)
            .join(jobs, jobs.c.id == remote_batches.c.job_id)
            .where(jobs.c.state.in_(LIVE_STATES))
            .order_by(remote_batches.c.round, remote_batches.c.shard, remote_batches.c.id)
        )
        found: dict[str, list[RemoteBatchRecord]] = {}
        with self._read() as conn:
            for row in conn.execute(query):
                record = _unchanged(_remote(row._mapping), known)
                found.setdefault(record.job_id, []).append(record)
        return found

    def remote_batches_by_job(self, job_ids: Collection[str] | None = None) -> dict[str, list[RemoteBatchRecord]]:
        """The remote batches of the given jobs (all jobs when None), by job id, in one query."""
        query = select(remote_batches).order_by(remote_batches.c.round, remote_batches.c.shard, remote_batches.c.id)
        if job_ids is not None:
            if not job_ids:
                return {}
            query = query.where(remote_batches.c.job_id.in_(list(job_ids)))
        found: dict[str, list[RemoteBatchRecord]] = {}
        with self._read() as conn:
            for row in conn.execute(query):
                record = _remote(row._mapping)
                found.setdefault(record.job_id, []).append(record)
        return found

    def bound_remote_ids(self) -> set[str]:
        """Remote batch ids already owned by some job (never adopted twice)."""
        with self._read() as conn:
            rows = conn.execute(select(remote_batches.c.remote_id).where(remote_batches.c.remote_id.is_not(None))).all()
        return {str(r[0]) for r in rows}

    # ------------------------------------------------------------ webhooks

    def _insert_events(self, conn: Connection, job_id: str | None, new: Sequence[NewEvent], now: float) -> None:
        for ev in new:
            conn.execute(insert(events).values(id=ev.id, job_id=job_id, type=ev.type, body=ev.body, created_at=now))
            for url, secret_ref in ev.targets:
                conn.execute(
                    insert(deliveries).values(
                        event_id=ev.id,
                        url=url,
                        secret_ref=secret_ref,
                        state="pending",
                        attempts=0,
                        next_attempt_at=now,
                    )
                )

    def _deliveries_query(self) -> Any:
        return select(
            deliveries,
            events.c.type.label("event_type"),
            events.c.job_id,
            events.c.body,
        ).join(events, events.c.id == deliveries.c.event_id)

    def due_deliveries(
        self,
        now: float,
        *,
        limit: int = 100,
        exclude: Collection[int] = (),
        skip_urls: Collection[str] = (),
        owner: str | None = None,
        lease_s: float = 60.0,
    ) -> list[Delivery]:
        """Pending deliveries due at `now`, oldest first; without `exclude` (attempts under way)
        and deliveries to `skip_urls` (endpoints whose queue is full).

        With `owner` they are also claimed for that daemon for `lease_s` (SKIP LOCKED): one
        sender at a time, and another daemon takes a delivery over once a dead sender's
        lease has ended (at least once, the same event id).
        """
        query = (
            self._deliveries_query()
            .where(deliveries.c.state == "pending", deliveries.c.next_attempt_at <= now)
            .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
            .limit(limit)
        )
        if exclude:
            query = query.where(deliveries.c.id.not_in(list(exclude)))
        if skip_urls:
            query = query.where(deliveries.c.url.not_in(list(skip_urls)))
        if owner is None:
            with self._read() as conn:
                return [_delivery(r._mapping) for r in conn.execute(query).all()]
        query = query.where(
            or_(deliveries.c.owner.is_(None), deliveries.c.owner == owner, deliveries.c.lease_until < now)
        ).with_for_update(of=deliveries, skip_locked=True)
        with self._write() as conn:
            found = [_delivery(r._mapping) for r in conn.execute(query).all()]
            if found:
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id.in_([d.id for d in found]))
                    .values(owner=owner, lease_until=now + lease_s)
                )
        return found

    def next_delivery_at(self, exclude: Collection[int] = (), *, skip_urls: Collection[str] = ()) -> float | None:
        """When the next pending delivery is due, leaving out `exclude` (attempts under way) and `skip_urls`."""
        query = select(func.min(deliveries.c.next_attempt_at)).where(deliveries.c.state == "pending")
        if exclude:
            query = query.where(deliveries.c.id.not_in(list(exclude)))
        if skip_urls:
            query = query.where(deliveries.c.url.not_in(list(skip_urls)))
        with self._read() as conn:
            value = conn.execute(query).scalar()
        return float(value) if value is not None else None

    def deliveries(self, *, event_id: str | None = None, job_id: str | None = None) -> list[Delivery]:
        query = self._deliveries_query().order_by(deliveries.c.id)
        if event_id is not None:
            query = query.where(deliveries.c.event_id == event_id)
        if job_id is not None:
            query = query.where(events.c.job_id == job_id)
        with self._read() as conn:
            return [_delivery(r._mapping) for r in conn.execute(query).all()]

    def pending_delivery_count(self) -> int:
        with self._read() as conn:
            value = conn.execute(
                select(func.count()).select_from(deliveries).where(deliveries.c.state == "pending")
            ).scalar()
        return int(value or 0)

    def update_delivery(self, delivery_id: int, **values: Any) -> None:
        with self._write() as conn:
            conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(**values))

    def disable_endpoint(self, url: str, reason: str) -> None:
        """Mark an endpoint gone (410) and park its pending deliveries as disabled."""
        now = self.now()
        with self._write() as conn:
            found = conn.execute(select(endpoints.c.url).where(endpoints.c.url == url)).first() is not None
            if not found:
                # Two 410s from one endpoint can be recorded at once; on PostgreSQL both may find
                # no row, and the second insert then fails on the key: it updates instead.
                try:
                    with conn.begin_nested():
                        conn.execute(insert(endpoints).values(url=url, disabled_at=now, reason=reason))
                except IntegrityError:
                    found = True
            if found:
                conn.execute(update(endpoints).where(endpoints.c.url == url).values(disabled_at=now, reason=reason))
            conn.execute(
                update(deliveries)
                .where(deliveries.c.url == url, deliveries.c.state == "pending")
                .values(state="disabled", last_error=reason)
            )

    def disabled_endpoints(self) -> dict[str, str]:
        with self._read() as conn:
            rows = conn.execute(
                select(endpoints.c.url, endpoints.c.reason).where(endpoints.c.disabled_at.is_not(None))
            ).all()
        return {str(url): str(reason or "") for url, reason in rows}

    def record_outcomes(self, outcomes: Sequence[tuple[int, Mapping[str, Any], float | None]]) -> None:
        """Several attempts' outcomes in one transaction: (delivery id, values, seen_next_at).

        The Deliverer commits together the outcomes that end while a commit is under way: a
        commit is an fsync, and one per delivery capped deliveries at about 200 a second.
        `seen_next_at` (a failed attempt) is the next_attempt_at the attempt started from. If it
        changed meanwhile, `batchd webhooks replay` made the delivery due again while the
        attempt ran: that wins (the row stays pending, due when the replay said), and only the
        attempt's own record (attempts, last status and error) is written.
        """
        own = ("attempts", "last_status", "last_error")
        # One statement per set of columns, executed for many rows: building a statement per
        # outcome cost more CPU than the delivery itself.
        plain: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for delivery_id, values, seen_next_at in outcomes:
            if seen_next_at is None:
                params = {f"v_{k}": v for k, v in values.items()}
                plain.setdefault(tuple(sorted(values)), []).append({"v_id": delivery_id, **params})
        with self._write() as conn:
            for columns, rows in plain.items():
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == bindparam("v_id"))
                    .values({c: bindparam(f"v_{c}") for c in columns}),
                    rows,
                )
            for delivery_id, values, seen_next_at in outcomes:
                if seen_next_at is None:
                    continue
                query = update(deliveries).where(deliveries.c.id == delivery_id)
                unchanged = query.where(deliveries.c.next_attempt_at == seen_next_at)
                if conn.execute(unchanged.values(**values)).rowcount == 0:
                    conn.execute(query.values(**{k: v for k, v in values.items() if k in own}))

    def get_event(self, event_id: str) -> StoredEvent | None:
        with self._read() as conn:
            row = conn.execute(select(events).where(events.c.id == event_id)).first()
        return _event(row._mapping) if row else None

    def job_events(self, job_id: str) -> list[StoredEvent]:
        with self._read() as conn:
            rows = conn.execute(
                select(events).where(events.c.job_id == job_id).order_by(events.c.created_at, events.c.id)
            ).all()
        return [_event(r._mapping) for r in rows]

    def replay_event(self, event_id: str, targets: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Send an event again to each (url, secret_ref): same id, same body bytes, due now.

        Returns, per url, "queued" (a new delivery row) or "due_now" (a pending one brought forward).
        """
        # A finished delivery (delivered, dead, parked) gets a new row rather than being reset:
        # the old row stays as the record of what happened (when it arrived, what killed it),
        # and the daemon never writes to a finished row, so nothing it does can undo the
        # replay. A delivery still pending is only made due now, so that one event never has
        # two deliveries under way to the same URL; an attempt of it running meanwhile keeps
        # that time (record_outcomes).
        now = self.now()
        done: dict[str, str] = {}
        with self._write() as conn:
            # Two replays of one event at once (PostgreSQL; SQLite's writers queue anyway): the
            # second waits for the first's rows, so it brings them forward instead of adding more.
            conn.execute(select(events.c.id).where(events.c.id == event_id).with_for_update())
            latest = conn.execute(
                select(deliveries.c.url, func.max(deliveries.c.id))
                .where(deliveries.c.event_id == event_id)
                .group_by(deliveries.c.url)
            ).all()
            latest_ids = {str(url): int(i) for url, i in latest}
            for url, secret_ref in targets:
                row_id = latest_ids.get(url)
                if row_id is not None:
                    brought = conn.execute(
                        update(deliveries)
                        .where(deliveries.c.id == row_id, deliveries.c.state == "pending")
                        .values(next_attempt_at=now)
                    ).rowcount
                    if brought:
                        done[url] = "due_now"
                        continue
                conn.execute(
                    insert(deliveries).values(
                        event_id=event_id, url=url, secret_ref=secret_ref, state="pending", attempts=0,
                        next_attempt_at=now,
                    )
                )  # fmt: skip
                done[url] = "queued"
        return done

    def enable_endpoint(self, url: str) -> int | None:
        """Undo a 410: the endpoint is enabled and its parked deliveries are due now.

        Returns how many deliveries were resumed, or None when the endpoint was not disabled.
        """
        now = self.now()
        with self._write() as conn:
            changed = conn.execute(
                update(endpoints)
                .where(endpoints.c.url == url, endpoints.c.disabled_at.is_not(None))
                .values(disabled_at=None, reason=None)
            ).rowcount
            if not changed:
                return None
            resumed = conn.execute(
                update(deliveries)
                .where(deliveries.c.url == url, deliveries.c.state == "disabled")
                .values(state="pending", next_attempt_at=now)
            ).rowcount
        return int(resumed)

    def endpoint_stats(self) -> list[EndpointStats]:
        """Per URL that deliveries went to (or that is disabled): counts by state, failures, replays."""
        states = ("pending", "delivered", "dead", "disabled")
        found: dict[str, dict[str, Any]] = {}
        latest_ids = select(func.max(deliveries.c.id)).group_by(deliveries.c.event_id, deliveries.c.url)
        last_errors = select(func.max(deliveries.c.id)).where(deliveries.c.last_error.is_not(None))
        with self._read() as conn:
            for url, state, n in conn.execute(
                select(deliveries.c.url, deliveries.c.state, func.count())
                .where(deliveries.c.id.in_(latest_ids.scalar_subquery()))
                .group_by(deliveries.c.url, deliveries.c.state)
            ).all():
                if state in states:
                    found.setdefault(str(url), {})[str(state)] = int(n)
            delivered_rows = func.sum(case((deliveries.c.state == "delivered", 1), else_=0))
            for url, attempts, delivered, rows, secret_ref, next_at in conn.execute(
                select(
                    deliveries.c.url,
                    func.sum(deliveries.c.attempts),
                    delivered_rows,
                    func.count(),
                    func.max(deliveries.c.secret_ref),
                    func.min(case((deliveries.c.state == "pending", deliveries.c.next_attempt_at))),
                ).group_by(deliveries.c.url)
            ).all():
                entry = found.setdefault(str(url), {})
                entry["failed_attempts"] = int(attempts or 0) - int(delivered or 0)
                entry["replayed"] = int(rows) - sum(entry.get(s, 0) for s in states)
                entry["secret_ref"] = secret_ref
                entry["next_attempt_at"] = float(next_at) if next_at is not None else None
            for url, error in conn.execute(
                select(deliveries.c.url, deliveries.c.last_error).where(
                    deliveries.c.id.in_(last_errors.group_by(deliveries.c.url).scalar_subquery())
                )
            ).all():
                found.setdefault(str(url), {})["last_error"] = error
            for url, disabled_at, reason in conn.execute(
                select(endpoints.c.url, endpoints.c.disabled_at, endpoints.c.reason).where(
                    endpoints.c.disabled_at.is_not(None)
                )
            ).all():
                found.setdefault(str(url), {}).update(disabled_at=float(disabled_at), disabled_reason=reason)
        return [EndpointStats(url=url, **values) for url, values in sorted(found.items())]


# ---------------------------------------------------------------- helpers


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # The daemon calls the Store from worker threads; each checkout is used by one thread at a time.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
            # Let SQLAlchemy's begin event emit BEGIN itself (the pysqlite recipe).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed intent survives a power cut, not only a process crash.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("batchd_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    # PostgreSQL. Pre-ping: a pooled connection may have died with a server restart or a failover.
    # A daemon's Store calls run in worker threads, a few at a time, so a modest pool serves it;
    # several daemons on one server stay far below its max_connections (100 by default).
    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    if parsed.get_driver_name() in ("psycopg", "psycopg2"):
        # libpq's own parameters; the URL's query, if it names them, wins.
        defaults = {"application_name": "batchd", "connect_timeout": 10}
        connect_args = {k: v for k, v in defaults.items() if k not in parsed.query}
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_timeout=30, connect_args=connect_args
    )


def _db_values(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, JobState) else v) for k, v in values.items()}


def _job(row: RowMapping) -> Job:
    data = dict(row)
    data["state"] = JobState(data["state"])
    data["metadata"] = data.get("metadata") or {}
    data["cancel_requested"] = bool(data.get("cancel_requested"))
    return Job(**data)


def _remote(row: RowMapping) -> RemoteBatchRecord:
    return RemoteBatchRecord(**dict(row))


_Record = TypeVar("_Record", Job, RemoteBatchRecord)


def _unchanged(fresh: _Record, known: Mapping[Any, _Record] | None) -> _Record:
    """The object read before when it equals the fresh one (frozen: either will do), else the fresh one."""
    before = known.get(fresh.id) if known else None
    return before if before is not None and before == fresh else fresh


def _event(row: RowMapping) -> StoredEvent:
    data = dict(row)
    data["body"] = bytes(data["body"])
    return StoredEvent(**data)


def _delivery(row: RowMapping) -> Delivery:
    data = dict(row)
    data["body"] = bytes(data["body"])
    return Delivery(**data)
