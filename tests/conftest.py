"""Shared fixtures: every test starts with no BATCHD_* variables from the outside world."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

#: Read by batchd (the config, the client) or by its helpers, never to be inherited by a test.
OUTSIDE_VARIABLES = ("TOGETHER_API_KEY", "TOGETHER_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "NOTIFY_SOCKET")


@pytest.fixture(autouse=True)
def _clean_batchd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("BATCHD_") or name in OUTSIDE_VARIABLES:
            monkeypatch.delenv(name)
    yield
