"""Prometheus metrics: what the daemon, the provider and the webhook worker report.

Metrics are off unless `[metrics] listen` is set; `enable()` is then called once
at start-up. Every hook below begins with one global read and returns at once
while metrics are off, so the daemon pays nothing for them by default.

Names (the `_total` suffix is added to counters on exposition):

* `batchd_jobs{state}`: jobs by state (refreshed by the scheduler loop on change, and every 30 s)
* `batchd_submissions_total`, `batchd_rejections_total`: files taken from the inbox
* `batchd_api_calls_total{endpoint,outcome}`: provider requests; endpoint is the call
  (`together.get`, `together.list`, `together.create`, ...), outcome the status class
  (`2xx` ... `5xx`) or `error` (no answer: connection failure, timeout)
* `batchd_api_request_duration_seconds{endpoint}`: until the answer's headers arrived
* `batchd_retries_total{what}`: a provider request repeated (what = the call) or a job
  step backed off (what = `step.<state>`)
* `batchd_poll_duration_seconds{mode}`: one poll round, `sweep` (one list call for
  every job in flight) or `get` (one call per due job)
* `batchd_job_duration_seconds{state}`: from submission to the terminal state
* `batchd_webhook_deliveries_total{outcome}`: attempts `delivered`, `retry`, `dead`,
  `gone` (410, endpoint disabled), and deliveries `parked` for a disabled endpoint
* `batchd_outbox_bytes_total`: bytes of output.jsonl, errors.jsonl and job.json written
* `batchd_scheduler_tick_duration_seconds`: one scheduler tick reading the active jobs
* `batchd_batches_stuck_total{provider}`: remote batches batchd cancelled as stuck (not running,
  or running without progress, past `stuck_after_s`); provider is the configured name
* `batchd_provider_webhooks_total{provider,outcome}`: provider batch events at /hooks/NAME:
  `polled` (a job made due), `unknown_batch`, `ignored` (another type), `refused` (not signed,
  stale, too large, malformed), `failed` (the database did not take it)
* `batchd_spend_usd{period}`, `batchd_budget_usd{period}`: with [budget], the estimated spend of
  the jobs let in this UTC `day` or `month`, and the budget
* `process_*`: CPU seconds, resident memory, open files of the daemon
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

from batchd.models import JobState

#: Job durations: from a minute-long demo to the 24 h completion window and beyond.
JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 43200, 86400, 172800)
#: Provider requests and poll rounds: milliseconds on loopback, seconds for a 100 MB upload.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric batchd exports, in a registry of its own (not prometheus-client's global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("batchd_jobs", "Jobs by state.", ["state"], registry=r)
        self.submissions = Counter("batchd_submissions", "Files accepted from the inbox as jobs.", registry=r)
        self.rejections = Counter("batchd_rejections", "Files rejected from the inbox.", registry=r)
        self.api_calls = Counter(
            "batchd_api_calls", "Provider API requests by endpoint and outcome.", ["endpoint", "outcome"], registry=r
        )
        self.api_seconds = Histogram(
            "batchd_api_request_duration_seconds", "Provider API request time until the answer's headers.",
            ["endpoint"], buckets=CALL_BUCKETS, registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "batchd_retries", "Provider requests repeated and job steps backed off.", ["what"], registry=r
        )
        self.poll_seconds = Histogram(
            "batchd_poll_duration_seconds", "One poll round (a list sweep, or one get per due job).", ["mode"],
            buckets=CALL_BUCKETS, registry=r,
        )  # fmt: skip
        self.job_seconds = Histogram(
            "batchd_job_duration_seconds", "Time from submission to the terminal state.", ["state"],
            buckets=JOB_BUCKETS, registry=r,
        )  # fmt: skip
        self.webhooks = Counter(
            "batchd_webhook_deliveries", "Webhook delivery attempts by outcome.", ["outcome"], registry=r
        )
        self.outbox_bytes = Counter("batchd_outbox_bytes", "Bytes written into outbox folders.", registry=r)
        self.tick_seconds = Histogram(
            "batchd_scheduler_tick_duration_seconds", "One scheduler tick: reading the active jobs and deciding.",
            buckets=CALL_BUCKETS, registry=r,
        )  # fmt: skip
        self.unexpected_errors = Counter(
            "batchd_unexpected_errors", "Errors no step expects (a bug), by where they happened.", ["where"], registry=r
        )
        self.faults = Gauge(
            "batchd_faults", "Outside faults now (1: failing), by the work that meets them.", ["where"], registry=r
        )
        self.parked_jobs = Counter("batchd_jobs_parked", "Jobs parked after repeated unexpected errors.", registry=r)
        self.spend = Gauge(
            "batchd_spend_usd", "Estimated spend of the jobs let in this UTC day or month (with [budget]).",
            ["period"], registry=r,
        )  # fmt: skip
        self.budget = Gauge("batchd_budget_usd", "The [budget] of a UTC day or month.", ["period"], registry=r)
        self.stuck_batches = Counter(
            "batchd_batches_stuck", "Remote batches cancelled as stuck, by configured provider.", ["provider"],
            registry=r,
        )  # fmt: skip
        self.provider_hooks = Counter(
            "batchd_provider_webhooks", "Provider batch events received at /hooks/NAME, by provider and outcome.",
            ["provider", "outcome"], registry=r,
        )  # fmt: skip
        ProcessCollector(registry=r)
        for state in JobState:
            self.jobs.labels(state.value).set(0)


_current: Metrics | None = None


def enable() -> Metrics:
    """Start collecting (idempotent); returns the metrics whose registry /metrics serves."""
    global _current
    if _current is None:
        # No `*_created` series beside every counter: the process start time tells the same.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        _current = Metrics()
    return _current


def disable() -> None:
    """Stop collecting; the hooks are no-ops again."""
    global _current
    _current = None


def current() -> Metrics | None:
    return _current


def outcome_of(status: int | None) -> str:
    """An HTTP status as a label: its class (`2xx` ... `5xx`), or `error` when no answer came."""
    return "error" if status is None else f"{status // 100}xx"


# ---------------------------------------------------------------- hooks (cheap no-ops while off)


def set_job_counts(counts: Mapping[str, int]) -> None:
    m = _current
    if m is None:
        return
    for state in JobState:
        m.jobs.labels(state.value).set(counts.get(state.value, 0))


def set_spend(rows: Iterable[tuple[str, float, float]]) -> None:
    """Spend against budget: (period, spent, budget) for each budget set."""
    m = _current
    if m is None:
        return
    for period, spent, budget in rows:
        m.spend.labels(period).set(spent)
        m.budget.labels(period).set(budget)


def intake(*, rejected: bool) -> None:
    m = _current
    if m is None:
        return
    (m.rejections if rejected else m.submissions).inc()


def api_call(endpoint: str, status: int | None, seconds: float) -> None:
    m = _current
    if m is None:
        return
    m.api_calls.labels(endpoint, outcome_of(status)).inc()
    m.api_seconds.labels(endpoint).observe(seconds)


def retry(what: str) -> None:
    m = _current
    if m is None:
        return
    m.retries.labels(what).inc()


def poll_round(mode: str, seconds: float) -> None:
    m = _current
    if m is None:
        return
    m.poll_seconds.labels(mode).observe(seconds)


def job_finished(state: str, seconds: float, files: Iterable[Path] = ()) -> None:
    """A job reached `state` `seconds` after its submission, having written `files` into its outbox."""
    m = _current
    if m is None:
        return
    m.job_seconds.labels(state).observe(max(0.0, seconds))
    written = 0
    for path in files:
        try:
            written += path.stat().st_size
        except OSError:
            continue
    m.outbox_bytes.inc(written)


def webhook(outcome: str) -> None:
    m = _current
    if m is None:
        return
    m.webhooks.labels(outcome).inc()


def tick(seconds: float) -> None:
    m = _current
    if m is None:
        return
    m.tick_seconds.observe(seconds)


def unexpected_error(where: str) -> None:
    m = _current
    if m is None:
        return
    m.unexpected_errors.labels(where).inc()


def fault(where: str, failing: bool) -> None:
    m = _current
    if m is None:
        return
    m.faults.labels(where).set(1 if failing else 0)


def job_parked() -> None:
    m = _current
    if m is None:
        return
    m.parked_jobs.inc()


def batch_stuck(provider: str) -> None:
    m = _current
    if m is None:
        return
    m.stuck_batches.labels(provider).inc()


def provider_hook(provider: str, outcome: str) -> None:
    """A provider's event at /hooks/NAME: `polled`, `unknown_batch`, `ignored`, `refused` or `failed`."""
    m = _current
    if m is None:
        return
    m.provider_hooks.labels(provider, outcome).inc()
