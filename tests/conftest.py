"""Shared fixtures: every test starts with no BATCHD_* variables from the outside world, and
gets the database of its own that `tests.databases` describes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import databases

#: Read by batchd (the config, the client) or by its helpers, never to be inherited by a test.
OUTSIDE_VARIABLES = ("TOGETHER_API_KEY", "TOGETHER_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "NOTIFY_SOCKET")


@pytest.fixture(autouse=True)
def _clean_batchd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("BATCHD_") or name in OUTSIDE_VARIABLES:
            monkeypatch.delenv(name)
    yield


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("each_database")
    if marker is not None:
        metafunc.parametrize("database_kind", databases.kinds_for_each_database(marker.args))


@pytest.fixture
def database_kind() -> str:
    """sqlite or postgresql: TEST_DATABASE's choice, or each in turn for `each_database` tests."""
    return databases.default_kind()


@pytest.fixture(autouse=True)
def _test_databases(database_kind: str) -> Iterator[databases.TestDatabases]:
    made = databases.begin_test(database_kind)
    try:
        yield made
    finally:
        databases.end_test(made)


def pytest_sessionfinish(session: pytest.Session) -> None:
    databases.dispose()
