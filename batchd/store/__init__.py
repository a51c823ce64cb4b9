"""The durable state of batchd: one SQL database behind one `Store`.

This package is the only part of batchd that speaks SQL. The `Store` is the front the rest
of the code holds: the connection, its transactions and migrations (`database.py`), and one
small class per aggregate, each in its own module:

    store.jobs        jobs and the named transitions of their life cycle   (jobs.py)
    store.batches     each job's remote batches: plans, creates, polls     (batches.py)
    store.deliveries  webhook events, deliveries and endpoints            (deliveries.py)
    store.cluster     the daemons sharing the database, and their leases  (cluster.py)
    store.signals     wake-ups from commands to the daemons               (signals.py)
    store.admission   the queue of jobs waiting for room at a provider    (admission.py)

Writes take typed records (`writes.py`) and name the transition they make; every method is
one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from batchd.store.admission import AdmissionStore, Verdict
from batchd.store.batches import CreatesBusy, RemoteBatchStore
from batchd.store.cluster import ClusterStore, daemon_state
from batchd.store.database import (
    LEASE,
    Database,
    Lease,
    StaleState,
    StoreUnavailable,
    is_database_error,
    safe_url,
)
from batchd.store.deliveries import DeliveryStore
from batchd.store.jobs import IllegalTransition, JobStore
from batchd.store.schema import SCHEMA_VERSION, schema_version
from batchd.store.signals import Signal, SignalStore
from batchd.store.writes import (
    DeadLettered,
    Delivered,
    DeliveryOutcome,
    Ending,
    EndpointGone,
    Hold,
    NewJob,
    NextCheck,
    Parked,
    PollAnswer,
    RejectedJob,
    RetryLater,
    ShardPlan,
)

__all__ = [
    "LEASE",
    "SCHEMA_VERSION",
    "AdmissionStore",
    "ClusterStore",
    "CreatesBusy",
    "DeadLettered",
    "Delivered",
    "DeliveryOutcome",
    "DeliveryStore",
    "Ending",
    "EndpointGone",
    "Hold",
    "IllegalTransition",
    "JobStore",
    "Lease",
    "NewJob",
    "NextCheck",
    "Parked",
    "PollAnswer",
    "RejectedJob",
    "RemoteBatchStore",
    "RetryLater",
    "ShardPlan",
    "Signal",
    "SignalStore",
    "StaleState",
    "Store",
    "StoreUnavailable",
    "Verdict",
    "daemon_state",
    "is_database_error",
    "open_existing",
    "safe_url",
    "schema_version",
]


def open_existing(url: str) -> Store | None:
    """The Store of an existing batchd database, to read; None when there is none yet.

    Nothing is created or migrated: the operator commands that only read must not leave a
    (root-owned) database behind. A missing SQLite file, or a database without batchd's
    tables, is "none yet". Raises StoreUnavailable when the database cannot be read (a
    server that is down, a file that is not a database).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        return None
    store = Store(url)
    try:
        tracked = store.has_schema()
    except SQLAlchemyError as exc:
        store.close()
        raise StoreUnavailable(f"cannot read the database: {exc.__cause__ or exc}") from exc
    if not tracked:
        store.close()
        return None
    return store


class Store(Database):
    """Jobs, remote batches, webhook deliveries and cluster membership in one SQL database."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(url, clock=clock)
        self.jobs = JobStore(self)
        self.batches = RemoteBatchStore(self)
        self.deliveries = DeliveryStore(self)
        self.cluster = ClusterStore(self)
        self.signals = SignalStore(self)
        self.admission = AdmissionStore(self)
