"""A job named by a name several jobs share is not guessed at: `show` lists the candidates."""

from __future__ import annotations

from pathlib import Path

from batchd.config import load_settings
from batchd.models import JobState
from batchd.store import Store
from tests.acceptance.test_cli import batchd, local_config
from tests.store_helpers import add_job


def test_show_with_a_shared_name_lists_the_candidates_and_acts_on_none(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    store = Store(load_settings(config, environ={}).database_url)
    store.migrate()
    try:
        add_job(store, "a" * 32, "nightly", state=JobState.COMPLETED)
        add_job(store, "b" * 32, "nightly", state=JobState.FAILED)
        add_job(store, "c" * 32, "weekly", state=JobState.COMPLETED)
    finally:
        store.close()
    shared = batchd("--config", str(config), "show", "nightly")
    assert shared.returncode == 1 and shared.stdout == ""
    assert "'nightly' matches 2 jobs" in shared.stderr
    assert "aaaaaaaa" in shared.stderr and "bbbbbbbb" in shared.stderr and "failed" in shared.stderr
    # An id, or a name only one job has, still names one job.
    assert batchd("--config", str(config), "show", "bbbbbbbb").returncode == 0
    assert batchd("--config", str(config), "show", "weekly").returncode == 0
    assert batchd("--config", str(config), "cancel", "nightly").returncode == 1
