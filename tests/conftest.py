"""Shared fixtures: every test starts with no BATCHD_* variables from the outside world."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_batchd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("BATCHD_") or name in ("TOGETHER_API_KEY", "OPENAI_API_KEY", "NOTIFY_SOCKET"):
            monkeypatch.delenv(name)
    yield
