"""Webhook events and their deliveries: the transactional outbox's other half (DESIGN §5).

An event's body bytes are stored once and sent identically on every attempt; each target URL
gets a delivery row, claimed by one sender at a time (a lease), retried until delivered,
dead-lettered or parked because its endpoint is disabled (410).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, assert_never

from sqlalchemy import Connection, bindparam, case, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from batchd.models import Delivery, DeliveryState, EndpointStats, NewEvent, StoredEvent
from batchd.store.database import Database
from batchd.store.rows import delivery_from_row, event_from_row
from batchd.store.schema import deliveries, endpoints, events
from batchd.store.signals import Signal, bump
from batchd.store.writes import DeadLettered, Delivered, DeliveryOutcome, EndpointGone, Parked, RetryLater

#: The `next_attempt_at` of a delivery held until its event's side effect is done (a rejected
#: file's event, until the file is in `rejected/`): never due, until `release_held`.
HELD = 2.0**62


def insert_events(
    conn: Connection, job_id: str | None, new: Sequence[NewEvent], now: float, *, held: bool = False
) -> None:
    """Insert events and a pending delivery per target, in the caller's transaction (the outbox);
    `held`: not to be sent before `release_held` (what the event says is still being done)."""
    for ev in new:
        conn.execute(insert(events).values(id=ev.id, job_id=job_id, type=ev.type, body=ev.body, created_at=now))
        for url, secret_ref in ev.targets:
            conn.execute(
                insert(deliveries).values(
                    event_id=ev.id,
                    url=url,
                    secret_ref=secret_ref,
                    state=DeliveryState.PENDING.value,
                    attempts=0,
                    next_attempt_at=HELD if held else now,
                )
            )


def _deliveries_query() -> Any:
    return select(
        deliveries,
        events.c.type.label("event_type"),
        events.c.job_id,
        events.c.body,
    ).join(events, events.c.id == deliveries.c.event_id)


class DeliveryStore:
    """The `events`, `deliveries` and `endpoints` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def due(
        self,
        now: float,
        *,
        limit: int = 100,
        exclude: Collection[int] = (),
        skip_urls: Collection[str] = (),
        owner: str | None = None,
        lease_s: float = 60.0,
        per_url: int | None = None,
        room: Mapping[str, int] | None = None,
    ) -> list[Delivery]:
        """Pending deliveries due at `now`, oldest first; without `exclude` (attempts under way)
        and deliveries to `skip_urls` (endpoints whose queue is full).

        With `per_url`, of the first `limit` due deliveries at most `per_url` per URL are taken
        (or what `room` says for that URL): the others are neither read whole (bodies
        included) nor claimed.

        With `owner` they are also claimed for that daemon for `lease_s` (SKIP LOCKED): one
        sender at a time, and another daemon takes a delivery over once a dead sender's
        lease has ended (at least once, the same event id).
        """
        due = deliveries.c.state == DeliveryState.PENDING.value, deliveries.c.next_attempt_at <= now
        order = (deliveries.c.next_attempt_at, deliveries.c.id)
        keys = select(deliveries.c.id, deliveries.c.url).where(*due).order_by(*order).limit(limit)
        if exclude:
            keys = keys.where(deliveries.c.id.not_in(list(exclude)))
        if skip_urls:
            keys = keys.where(deliveries.c.url.not_in(list(skip_urls)))
        if owner is not None:
            mine = or_(deliveries.c.owner.is_(None), deliveries.c.owner == owner, deliveries.c.lease_until < now)
            keys = keys.where(mine).with_for_update(skip_locked=True)
        with self._db.read() if owner is None else self._db.write() as conn:
            # The ids first, then whole rows for the ones taken only: an endpoint with little room
            # left read a full batch of bodies (and claimed it) to take on a few of them.
            left = dict(room or {})
            ids = []
            for delivery_id, url in conn.execute(keys).all():
                if per_url is None:
                    ids.append(delivery_id)
                elif left.setdefault(url, per_url) > 0:
                    left[url] -= 1
                    ids.append(delivery_id)
            if not ids:
                return []
            rows = conn.execute(_deliveries_query().where(deliveries.c.id.in_(ids)).order_by(*order)).all()
            if owner is not None:
                conn.execute(
                    update(deliveries).where(deliveries.c.id.in_(ids)).values(owner=owner, lease_until=now + lease_s)
                )
        return [delivery_from_row(r._mapping) for r in rows]

    def next_due_at(
        self, exclude: Collection[int] = (), *, skip_urls: Collection[str] = (), after: float | None = None
    ) -> float | None:
        """When the next pending delivery is due, leaving out `exclude` (attempts under way) and `skip_urls`.

        With `after`, only deliveries due later than that count (found in the index's order:
        the earliest one that qualifies ends the search, however many come before it).
        """
        query = (
            select(deliveries.c.next_attempt_at)
            .where(deliveries.c.state == DeliveryState.PENDING.value, deliveries.c.next_attempt_at < HELD)
            .order_by(deliveries.c.next_attempt_at)
            .limit(1)
        )
        if after is not None:
            query = query.where(deliveries.c.next_attempt_at > after)
        if exclude:
            query = query.where(deliveries.c.id.not_in(list(exclude)))
        if skip_urls:
            query = query.where(deliveries.c.url.not_in(list(skip_urls)))
        with self._db.read() as conn:
            value = conn.execute(query).scalar()
        return float(value) if value is not None else None

    def select(self, *, event_id: str | None = None, job_id: str | None = None) -> list[Delivery]:
        query = _deliveries_query().order_by(deliveries.c.id)
        if event_id is not None:
            query = query.where(deliveries.c.event_id == event_id)
        if job_id is not None:
            query = query.where(events.c.job_id == job_id)
        with self._db.read() as conn:
            return [delivery_from_row(r._mapping) for r in conn.execute(query).all()]

    def release_held(self, job_id: str | None = None) -> int:
        """The held deliveries of `job_id`'s events (all of them without one: at start-up, once
        the half-done work they waited for is done) are due now; the daemons are told."""
        now = self._db.now()
        query = update(deliveries).where(
            deliveries.c.state == DeliveryState.PENDING.value, deliveries.c.next_attempt_at == HELD
        )
        if job_id is not None:
            query = query.where(deliveries.c.event_id.in_(select(events.c.id).where(events.c.job_id == job_id)))
        with self._db.write() as conn:
            released = int(conn.execute(query.values(next_attempt_at=now)).rowcount)
            if released:
                bump(conn, Signal.DELIVERIES)
        return released

    def pending_count(self) -> int:
        with self._db.read() as conn:
            value = conn.execute(
                select(func.count()).select_from(deliveries).where(deliveries.c.state == DeliveryState.PENDING.value)
            ).scalar()
        return int(value or 0)

    def disable_endpoint(self, url: str, reason: str) -> None:
        """Mark an endpoint gone (410) and park its pending deliveries as disabled."""
        now = self._db.now()
        with self._db.write() as conn:
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
                .where(deliveries.c.url == url, deliveries.c.state == DeliveryState.PENDING.value)
                .values(state=DeliveryState.DISABLED.value, last_error=reason)
            )

    def disabled_endpoints(self) -> dict[str, str]:
        with self._db.read() as conn:
            rows = conn.execute(
                select(endpoints.c.url, endpoints.c.reason).where(endpoints.c.disabled_at.is_not(None))
            ).all()
        return {str(url): str(reason or "") for url, reason in rows}

    def record_outcomes(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        """Several attempts' outcomes (and parked deliveries) in one transaction.

        The Deliverer commits together the outcomes that end while a commit is under way: a
        commit is an fsync, and one per delivery capped deliveries at about 200 a second.
        `seen_next_at` (a failed attempt: RetryLater, DeadLettered) is the next_attempt_at the
        attempt started from. If it changed meanwhile, `batchd webhooks replay` made the delivery
        due again while the attempt ran: that wins (the row stays pending, due when the replay
        said), and only the attempt's own record (attempts, last status and error) is written.
        """
        own = ("attempts", "last_status", "last_error")
        written = [_outcome_values(outcome) for outcome in outcomes]
        # One statement per set of columns, executed for many rows: building a statement per
        # outcome cost more CPU than the delivery itself.
        plain: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for delivery_id, values, seen_next_at in written:
            if seen_next_at is None:
                params = {f"v_{k}": v for k, v in values.items()}
                plain.setdefault(tuple(sorted(values)), []).append({"v_id": delivery_id, **params})
        with self._db.write() as conn:
            for columns, rows in plain.items():
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == bindparam("v_id"))
                    .values({c: bindparam(f"v_{c}") for c in columns}),
                    rows,
                )
            for delivery_id, values, seen_next_at in written:
                if seen_next_at is None:
                    continue
                query = update(deliveries).where(deliveries.c.id == delivery_id)
                unchanged = query.where(deliveries.c.next_attempt_at == seen_next_at)
                if conn.execute(unchanged.values(**values)).rowcount == 0:
                    conn.execute(query.values(**{k: v for k, v in values.items() if k in own}))

    def get_event(self, event_id: str) -> StoredEvent | None:
        with self._db.read() as conn:
            row = conn.execute(select(events).where(events.c.id == event_id)).first()
        return event_from_row(row._mapping) if row else None

    def job_events(self, job_id: str) -> list[StoredEvent]:
        with self._db.read() as conn:
            rows = conn.execute(
                select(events).where(events.c.job_id == job_id).order_by(events.c.created_at, events.c.id)
            ).all()
        return [event_from_row(r._mapping) for r in rows]

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
        now = self._db.now()
        done: dict[str, str] = {}
        with self._db.write() as conn:
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
                        .where(deliveries.c.id == row_id, deliveries.c.state == DeliveryState.PENDING.value)
                        .values(next_attempt_at=now)
                    ).rowcount
                    if brought:
                        done[url] = "due_now"
                        continue
                conn.execute(
                    insert(deliveries).values(
                        event_id=event_id, url=url, secret_ref=secret_ref, state=DeliveryState.PENDING.value,
                        attempts=0, next_attempt_at=now,
                    )
                )  # fmt: skip
                done[url] = "queued"
            bump(conn, Signal.DELIVERIES)
        return done

    def enable_endpoint(self, url: str) -> int | None:
        """Undo a 410: the endpoint is enabled and its parked deliveries are due now.

        Returns how many deliveries were resumed, or None when the endpoint was not disabled.
        """
        now = self._db.now()
        with self._db.write() as conn:
            changed = conn.execute(
                update(endpoints)
                .where(endpoints.c.url == url, endpoints.c.disabled_at.is_not(None))
                .values(disabled_at=None, reason=None)
            ).rowcount
            if not changed:
                return None
            resumed = conn.execute(
                update(deliveries)
                .where(deliveries.c.url == url, deliveries.c.state == DeliveryState.DISABLED.value)
                .values(state=DeliveryState.PENDING.value, next_attempt_at=now)
            ).rowcount
            bump(conn, Signal.DELIVERIES)
        return int(resumed)

    def endpoint_stats(self) -> list[EndpointStats]:
        """Per URL that deliveries went to (or that is disabled): counts by state, failures, replays."""
        states = tuple(state.value for state in DeliveryState)
        found: dict[str, dict[str, Any]] = {}
        latest_ids = select(func.max(deliveries.c.id)).group_by(deliveries.c.event_id, deliveries.c.url)
        last_errors = select(func.max(deliveries.c.id)).where(deliveries.c.last_error.is_not(None))
        with self._db.read() as conn:
            for url, state, n in conn.execute(
                select(deliveries.c.url, deliveries.c.state, func.count())
                .where(deliveries.c.id.in_(latest_ids.scalar_subquery()))
                .group_by(deliveries.c.url, deliveries.c.state)
            ).all():
                if state in states:
                    found.setdefault(str(url), {})[str(state)] = int(n)
            delivered_rows = func.sum(case((deliveries.c.state == DeliveryState.DELIVERED.value, 1), else_=0))
            for url, attempts, delivered, rows, secret_ref, next_at in conn.execute(
                select(
                    deliveries.c.url,
                    func.sum(deliveries.c.attempts),
                    delivered_rows,
                    func.count(),
                    func.max(deliveries.c.secret_ref),
                    func.min(case((deliveries.c.state == DeliveryState.PENDING.value, deliveries.c.next_attempt_at))),
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


def _outcome_values(outcome: DeliveryOutcome) -> tuple[int, dict[str, Any], float | None]:
    """The delivery's id, the columns an outcome writes, and its `seen_next_at` (None: written as is)."""
    match outcome:
        case Delivered():
            values: dict[str, Any] = {
                "state": DeliveryState.DELIVERED.value, "attempts": outcome.attempts, "last_status": outcome.status,
                "last_error": None, "delivered_at": outcome.delivered_at,
            }  # fmt: skip
            return outcome.delivery_id, values, None
        case RetryLater():
            values = {
                "attempts": outcome.attempts, "next_attempt_at": outcome.next_attempt_at,
                "last_status": outcome.status, "last_error": outcome.error,
            }  # fmt: skip
            return outcome.delivery_id, values, outcome.seen_next_at
        case DeadLettered():
            values = {
                "state": DeliveryState.DEAD.value, "attempts": outcome.attempts, "last_status": outcome.status,
                "last_error": outcome.error,
            }  # fmt: skip
            return outcome.delivery_id, values, outcome.seen_next_at
        case EndpointGone():
            # The error is left to disable_endpoint, which parks the delivery with its reason.
            return outcome.delivery_id, {"attempts": outcome.attempts, "last_status": outcome.status}, None
        case Parked():
            return outcome.delivery_id, {"state": DeliveryState.DISABLED.value, "last_error": outcome.reason}, None
        case _:
            assert_never(outcome)
