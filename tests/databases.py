"""The database each test runs on: a SQLite file, or a PostgreSQL database of its own.

`TEST_DATABASE` picks it for the whole run (read once, at import; the name is outside
`BATCHD_*`, which every test clears):

* unset: SQLite, except that tests marked `each_database` run on both (or on those the
  marker names: `each_database(POSTGRESQL)` for what only PostgreSQL can show);
* `sqlite`: SQLite only (a machine without a PostgreSQL server);
* `postgresql`: every test on PostgreSQL.

Tests and their helpers ask `database_url(path)` for the URL to put in a Store or in a
config's `database_url`: `sqlite:///path` on SQLite; on PostgreSQL a new database
`batchd_test_<random>` on the server at `TEST_POSTGRES_URL` (default: the local server, user
`postgres`, trust auth, as on CI's machine), the same one for the same path within a test,
dropped when the test ends.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
KINDS = (SQLITE, POSTGRESQL)

ENV = "TEST_DATABASE"
ADMIN_URL_ENV = "TEST_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

#: What TEST_DATABASE said ("" when unset), read before any test clears the environment.
CHOSEN = os.environ.get(ENV, "").strip().lower()
if CHOSEN not in ("", *KINDS):
    raise RuntimeError(f"{ENV} must be {' or '.join(KINDS)}, not {CHOSEN!r}")
ADMIN_URL = os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL
if make_url(ADMIN_URL).drivername in ("postgresql", "postgres"):
    # As batchd's config does: a plain postgresql:// URL means the driver of the postgres extra.
    ADMIN_URL = make_url(ADMIN_URL).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
#: On CI (CI=true) a PostgreSQL server that cannot be reached fails the tests that need it.
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def kinds_for_each_database(only: tuple[str, ...] = ()) -> list[str]:
    """The kinds a test marked `each_database(*only)` runs on."""
    return [kind for kind in (only or KINDS) if not CHOSEN or kind == CHOSEN]


def default_kind() -> str:
    """The kind every other test runs on."""
    return CHOSEN or SQLITE


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


_admin: Engine | None = None
_reachable: bool | str | None = None


def _admin_engine() -> Engine:
    global _admin
    if _admin is None:
        # No pool: a connection per CREATE/DROP, none left open between tests.
        _admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    return _admin


def require_postgresql() -> None:
    """Skip the test when the server cannot be reached, unless PostgreSQL was asked for or on CI."""
    global _reachable
    if _reachable is None:
        try:
            with _admin_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
            _reachable = True
        except SQLAlchemyError as exc:
            cause = exc.__cause__ or exc
            _reachable = f"{type(cause).__name__}: {str(cause).strip()}"
    if _reachable is not True:
        message = f"PostgreSQL at {make_url(ADMIN_URL).render_as_string(hide_password=True)} unreachable: {_reachable}"
        if CHOSEN == POSTGRESQL or ON_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


class TestDatabases:
    """The databases of one test: made on first use, dropped at its end."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._made: dict[Path, str] = {}

    def url(self, path: Path) -> str:
        if self.kind == SQLITE:
            return f"sqlite:///{path}"
        key = path.absolute()
        if key not in self._made:
            name = f"batchd_test_{secrets.token_hex(6)}"
            with _admin_engine().connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            self._made[key] = name
        return make_url(ADMIN_URL).set(database=self._made[key]).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        if not self._made:
            return
        # FORCE: a connection a test left open (a killed daemon's, an unclosed pool) does not
        # keep its database alive.
        with _admin_engine().connect() as conn:
            for name in self._made.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._made.clear()


_current: TestDatabases | None = None


def database_url(path: Path) -> str:
    """The URL of this test's database for `path` (the SQLite file it would be)."""
    if _current is None:
        # Outside a test (the benchmarks reuse the acceptance helpers): a SQLite file.
        return f"sqlite:///{path}"
    return _current.url(path)


def begin_test(kind: str) -> TestDatabases:
    global _current
    if kind == POSTGRESQL:
        require_postgresql()
    _current = TestDatabases(kind)
    return _current


def end_test(databases: TestDatabases) -> None:
    global _current
    _current = None
    databases.drop_all()


def dispose() -> None:
    global _admin
    if _admin is not None:
        _admin.dispose()
        _admin = None
