"""What the scheduler loop tells the outside world, and the /metrics, /healthz, status page and
provider webhooks listener.

`LoopMonitor.tick()` is called by the scheduler loop once per tick, after it
read what is due. It records the tick (what /healthz checks), and when jobs
may have changed (a step ended; at most once a second), or every
STATUS_EVERY_S, sends systemd a `STATUS=` line and refreshes the
`batchd_jobs` gauge.

The listener (`[metrics] listen`) is uvicorn, the ASGI server batchd already
runs for its embedded backend, in the daemon's own event loop: a stuck
scheduler task is seen by /healthz (503), and a blocked event loop answers
nothing at all, which every health checker treats as a failure too.
prometheus-client's own server would add a thread per process that outlives
a stopped daemon's loop and answers /metrics while nothing else works.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from batchd import metrics, systemd
from batchd.asgi_server import serve_app
from batchd.config import ConfigError, Settings
from batchd.faults import Faults
from batchd.hooks import hook_routes, hooked_providers
from batchd.hooks.route import PREFIX as HOOKS_PREFIX
from batchd.models import JobState
from batchd.status import TokenGate, status_routes
from batchd.status.queries import spend_against_budget
from batchd.store import Store

log = structlog.get_logger("batchd.health")

#: STATUS= and the jobs gauge are refreshed at least this often, even when nothing changed.
STATUS_EVERY_S = 30.0
#: ...and at most this often while jobs change (each refresh counts every job by state).
STATUS_MIN_GAP_S = 1.0
#: The scheduler ticks at least once a second (daemon.core.IDLE_TICK_S); this many missed ticks is stuck.
STUCK_AFTER_TICKS = 30
#: /healthz gives the database this long to take a write.
DB_PROBE_TIMEOUT_S = 5.0
#: Without a wake-up the loop re-reads the jobs after its period, or after this many times
#: the last read took, whichever is longer: with 10,000 jobs in flight a read takes most of
#: a second, and a loop reading every second would do little else.
READ_DUTY_FACTOR = 10


def status_line(counts: dict[str, int], pending_webhooks: int) -> str:
    """One line for `systemctl status`: jobs by state, active ones first, then the webhook backlog."""
    active = [(s.value, counts.get(s.value, 0)) for s in JobState if not s.terminal and counts.get(s.value)]
    done = [(s.value, counts.get(s.value, 0)) for s in JobState if s.terminal and counts.get(s.value)]

    def part(label: str, items: list[tuple[str, int]]) -> str:
        total = sum(n for _, n in items)
        detail = ", ".join(f"{n} {state}" for state, n in items)
        return f"{total} {label} ({detail})" if items else f"0 {label}"

    return f"{part('active', active)}; {part('done', done)}; {pending_webhooks} webhooks pending"


class LoopMonitor:
    """The scheduler loop's heartbeat: STATUS= for systemd, the jobs gauge, the last tick for /healthz."""

    def __init__(
        self,
        store: Store,
        *,
        period_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        notify: Callable[[str], object] = systemd.notify,
        status_every_s: float = STATUS_EVERY_S,
        faults: Faults | None = None,
    ) -> None:
        self._store = store
        #: what fails around the daemon now: appended to STATUS=, and /healthz fails while any does
        self.faults = faults or Faults()
        self._faults_said = ""
        self._clock = clock
        self._notify = notify
        self._status_every_s = status_every_s
        #: the scheduler's idle period; /healthz calls the loop stuck after STUCK_AFTER_TICKS of them
        self.period_s = period_s
        self.started_at = clock()
        self.last_tick: float | None = None
        #: how long the last tick's reads took
        self.last_read_s = 0.0
        self._tick_began: float | None = None
        #: jobs may have changed since the last report
        self._dirty = True
        self._status_at = -float("inf")
        #: the last STATUS= text sent
        self.status = ""

    def begin(self) -> None:
        """The loop starts a tick (before its reads): the tick's duration is measured from here."""
        self._tick_began = self._clock()

    async def tick(self, *, changed: bool = False) -> None:
        """The loop has read what is due. Report when jobs may have changed (`changed`: a step
        ended), at most every STATUS_MIN_GAP_S, or when the faults changed or the last report is old.

        The counts are one GROUP BY over the jobs: done when they may have changed, not per tick.
        """
        now = self._clock()
        self.last_tick = now
        if self._tick_began is not None:
            self.last_read_s = now - self._tick_began
            metrics.tick(self.last_read_s)
        self._dirty = self._dirty or changed
        failing = self.faults.summary()
        since = now - self._status_at
        if not (
            failing != self._faults_said or since >= self._status_every_s or (self._dirty and since >= STATUS_MIN_GAP_S)
        ):
            return
        self._dirty = False
        self._status_at = now
        self._faults_said = failing
        counts = await anyio.to_thread.run_sync(self._store.jobs.counts_by_state)
        pending = await anyio.to_thread.run_sync(self._store.deliveries.pending_count)
        metrics.set_job_counts(counts)
        self.status = status_line(counts, pending) + (f"; {failing}" if failing else "")
        self._notify(f"STATUS={self.status}")

    def announce_faults(self) -> None:
        """STATUS= while the loop cannot tick (the database is down): the faults, said once per change."""
        failing = self.faults.summary()
        if failing and failing != self._faults_said:
            self._faults_said = failing
            self.status = failing
            self._notify(f"STATUS={failing}")

    def idle_s(self) -> float:
        """How long the loop may wait for a wake-up before reading again (see READ_DUTY_FACTOR)."""
        return max(self.period_s, READ_DUTY_FACTOR * self.last_read_s)

    def stuck_for(self) -> float | None:
        """Seconds since the last tick when that is more than STUCK_AFTER_TICKS idle periods, else None."""
        since = self._clock() - (self.last_tick if self.last_tick is not None else self.started_at)
        return since if since > STUCK_AFTER_TICKS * self.idle_s() else None


class Health:
    """The answers of /healthz: is the scheduler loop ticking, and does the database take a write?"""

    def __init__(self, monitor: LoopMonitor, store: Store, *, db_timeout_s: float = DB_PROBE_TIMEOUT_S) -> None:
        self._monitor = monitor
        self._store = store
        self._db_timeout_s = db_timeout_s
        #: monotonic start of a write probe whose thread has not returned (a hung database)
        self._probe_since: float | None = None
        self._probe_error: str | None = None

    def _probe(self) -> None:
        """In a worker thread: one write transaction; the outcome is left for the next check too."""
        try:
            self._store.probe_write()
            self._probe_error = None
        except Exception as exc:
            self._probe_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._probe_since = None

    async def database_problem(self) -> str | None:
        """Why the database cannot be written now, or None."""
        if self._probe_since is not None:
            # One probe at a time: a hung database must not collect a thread per health check.
            return f"a write has not finished after {time.monotonic() - self._probe_since:.1f} s"
        self._probe_since = time.monotonic()
        with anyio.move_on_after(self._db_timeout_s):
            await anyio.to_thread.run_sync(self._probe, abandon_on_cancel=True)
            return self._probe_error
        return f"a write did not finish within {self._db_timeout_s:g} s"

    async def check(self) -> tuple[bool, dict[str, Any]]:
        stuck = self._monitor.stuck_for()
        db_problem = await self.database_problem()
        last = self._monitor.last_tick
        faults = self._monitor.faults.current()
        report: dict[str, Any] = {
            "status": "ok" if stuck is None and db_problem is None and not faults else "failing",
            "scheduler": "ok" if stuck is None else f"no tick for {stuck:.1f} s",
            "last_tick_age_s": None if last is None else round(time.monotonic() - last, 3),
            "database": db_problem or "ok",
            "jobs": self._monitor.status,
            # what the daemon's work meets now (a full disk, the database, a loop that crashed)
            "faults": faults,
        }
        return report["status"] == "ok", report


def create_metrics_app(
    health: Health,
    registry: Any,
    *,
    routes: Sequence[BaseRoute] = (),
    tokens: Sequence[str] = (),
    hooks: Sequence[BaseRoute] = (),
    spend: Callable[[], list[tuple[str, float, float]]] | None = None,
) -> Starlette:
    """`GET /metrics` (Prometheus text format) and `GET /healthz` (200 ok, 503 failing; JSON either way),
    beside `routes` (the status page); with `tokens`, every route asks for one (batchd/status/auth.py),
    but `hooks` (a provider's webhooks under /hooks/, signed instead: batchd/hooks). `spend` reads the
    spend against each budget, when one is set (read per scrape: two sums)."""

    async def metrics_page(_request: Request) -> Response:
        if spend is not None:
            try:
                metrics.set_spend(await anyio.to_thread.run_sync(spend))
            except Exception as exc:
                # The database away: /metrics still answers, with the figures it had.
                log.warning("metrics.spend_unread", error=str(exc))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_request: Request) -> Response:
        ok, report = await health.check()
        return JSONResponse(report, status_code=200 if ok else 503)

    gate = [Middleware(TokenGate, tokens=tokens, open_prefixes=(HOOKS_PREFIX,) if hooks else ())] if tokens else []
    return Starlette(
        routes=[Route("/metrics", metrics_page), Route("/healthz", healthz), *routes, *hooks], middleware=gate
    )


@asynccontextmanager
async def serve_metrics(
    address: tuple[str, int] | None,
    monitor: LoopMonitor,
    store: Store,
    settings: Callable[[], Settings] | None = None,
    *,
    wake: Callable[[], None] | None = None,
) -> AsyncIterator[str | None]:
    """Serve /metrics and /healthz on `address` for the life of the block (nothing when None); yield the URL.

    With `settings` (the current config), the status page too, and `[metrics] token_file`'s
    token is asked for on every route (read at start, as `listen` is). With `wake` too (how a
    job made due reaches the scheduler), a provider's webhooks at /hooks/NAME, when a provider
    has a `webhook_secret` at start (providers change only with a restart).
    """
    if address is None:
        yield None
        return
    registry = metrics.enable().registry
    routes = status_routes(store, settings) if settings is not None else []
    tokens = [t.reveal() for t in settings().metrics.tokens] if settings is not None else []
    hooked = hooked_providers(settings()) if settings is not None and wake is not None else []
    hooks = hook_routes(store, settings, wake=wake) if settings is not None and wake is not None and hooked else []
    try:
        async with AsyncExitStack() as stack:
            spend = (lambda: spend_against_budget(store, settings(), time.time())) if settings is not None else None
            app = create_metrics_app(
                Health(monitor, store), registry, routes=routes, tokens=tokens, hooks=hooks, spend=spend
            )
            try:
                url = await stack.enter_async_context(serve_app(app, *address))
            except OSError as exc:
                raise ConfigError(f"metrics.listen: cannot listen on {address[0]}:{address[1]}: {exc}") from exc
            log.info(
                "metrics.listening", url=url, metrics=f"{url}/metrics", healthz=f"{url}/healthz",
                status_page=f"{url}/" if routes else None, auth_required=bool(tokens),
                provider_webhooks=[f"{url}{HOOKS_PREFIX}{name}" for name in hooked] if hooks else None,
            )  # fmt: skip
            yield url
    finally:
        metrics.disable()
