"""The connection to batchd's database: engine set-up, transactions, migrations, fencing.

Every aggregate of the store (jobs, remote batches, deliveries, cluster) writes through
`Database.write()`, one transaction per call, so a state transition and the webhook events
it causes commit together or not at all (the transactional outbox of DESIGN §2).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    create_engine,
    event,
    func,
    insert,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from batchd import chaos
from batchd.store.schema import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION, jobs, metadata, schema_version


class StaleState(Exception):
    """A transition expected a state the job is no longer in (or a lease this daemon lost)."""


class StoreUnavailable(Exception):
    """The database cannot be opened or brought to this batchd's schema (said without the password)."""


def is_database_error(exc: BaseException) -> bool:
    """Whether `exc` comes from the database (down, locked, read-only, a full disk under it), not
    from batchd's own logic: such a failure is waited out, never counted against a job."""
    return isinstance(exc, SQLAlchemyError | StoreUnavailable | sqlite3.Error)


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


def fenced(conn: Connection, job_ids: Collection[str]) -> set[str]:
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


def guard(conn: Connection, job_id: str) -> None:
    """Raise StaleState unless the current LEASE may write `job_id`."""
    if job_id not in fenced(conn, [job_id]):
        raise StaleState(f"job {job_id} is no longer held by this daemon (its lease was lost)")


class Database:
    """One engine, its clock, and the transactions every part of the store runs in."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self._engine = _make_engine(url)
        #: SQLite has one writer at a time: this process's writers queue here, in order, rather
        #: than on SQLite's busy handler, whose sleeps grow to 100 ms while the lock is held (four
        #: takes of a burst in parallel wrote a third slower than one alone). Other processes (a
        #: command, a second daemon on the same file) still meet busy_timeout. Reentrant: a write
        #: within a write stays SQLite's business, as before. PostgreSQL's writers run side by side.
        self._writing: AbstractContextManager[Any] = (
            threading.RLock() if self._engine.dialect.name == "sqlite" else nullcontext()
        )

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def now(self) -> float:
        return float(self._clock())

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction. On SQLite it is BEGIN IMMEDIATE: the write lock is taken up front,
        so two writers queue on busy_timeout instead of failing half-way with "database is locked"."""
        moment = chaos.store_moment() if chaos.strikes("store", "write") else None
        with self._writing, self._engine.connect().execution_options(batchd_write=True) as conn, conn.begin():
            if moment == "before":
                raise _injected("before its commit")
            yield conn
        if moment == "after":
            raise _injected("after its commit")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        if chaos.strikes("store", "read"):
            raise _injected("a read")
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
        with self.write() as conn:
            if conn.dialect.name == "postgresql":
                # DDL is transactional there and writers do not queue as SQLite's BEGIN IMMEDIATE
                # makes them: without the lock, two daemons would both find no table and both
                # create it. The lock is released with the transaction.
                conn.execute(select(func.pg_advisory_xact_lock(literal(MIGRATION_LOCK, BigInteger))))
            metadata.tables["schema_version"].create(conn, checkfirst=True)
            found = conn.execute(select(func.max(schema_version.c.version))).scalar()
            current = int(found or 0)
            if current > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"the database {safe_url(self.url)} has schema version {current}, newer than this"
                    f" batchd knows ({SCHEMA_VERSION}): upgrade batchd"
                )
            refresh = False
            for version, step in MIGRATIONS:
                if version > current:
                    refresh = bool(step(conn)) or refresh
                    conn.execute(schema_version.delete())
                    conn.execute(insert(schema_version).values(version=version))
            if refresh:
                # Imported here: due.py builds on the tables and on the life cycle.
                from batchd.store.due import refresh_all

                refresh_all(conn)
        return current

    def has_schema(self) -> bool:
        """Whether batchd's tables exist: a new database (or a new SQLite file) has none until migrate()."""
        with self._engine.connect() as conn:
            return inspect(conn).has_table(schema_version.name)

    def schema_version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 0)

    def probe_write(self) -> None:
        """A write transaction that changes nothing: raises when the database cannot take a write (/healthz)."""
        with self.write() as conn:
            conn.execute(update(schema_version).values(version=schema_version.c.version))


def _injected(moment: str) -> OperationalError:
    """The error a chaos-struck transaction raises (BATCHD_CHAOS; tests only)."""
    return OperationalError(f"chaos: {moment}", None, sqlite3.OperationalError("disk I/O error (injected)"))


#: The SQLite database and its journals: the service user's alone, whatever the umask.
SQLITE_MODE = 0o600


def _private_files(database: Path) -> None:
    """Create the SQLite file 0600 (SQLite gives its -wal and -shm the database's mode) and bring
    the files an older release made under a loose umask to 0600. Best effort: an operator's
    command run as another user leaves them as they are."""
    for path, create in ((database, os.O_CREAT), (database.with_name(f"{database.name}-wal"), 0),
                         (database.with_name(f"{database.name}-shm"), 0)):  # fmt: skip
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | create, SQLITE_MODE)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != SQLITE_MODE:
                os.fchmod(fd, SQLITE_MODE)
        finally:
            os.close(fd)


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # The daemon calls the Store from worker threads; each checkout is used by one thread at a time.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            _private_files(Path(database))

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
