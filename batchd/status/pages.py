"""The status page's HTML: pure functions from what `queries.py` read to a document.

Every value is escaped (`_e`): job names are file names anyone with the inbox may choose,
errors come from providers and receivers. Every URL is shown through
`batchd.urls.redact_url`; no secret is in anything these functions are given but URLs. The
pages link only to this listener's own paths, and name no outside resource.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from batchd.cli.records import human_age, progress_of
from batchd.models import Delivery, Job, JobState, RemoteBatchRecord
from batchd.status.queries import JobDetail, Listing
from batchd.urls import redact_url

#: Seconds between refreshes by the page's script (it reads this from the page).
REFRESH_S = 5


def _e(value: object) -> str:
    """Text for HTML: escaped, quotes included (it may land in an attribute); None is "-"."""
    return "-" if value is None else escape(str(value), quote=True)


def _when(ts: float | None) -> str:
    """A time as UTC to the second, in a <time> element; "-" when it has not happened."""
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts, UTC)
    return f'<time datetime="{moment.isoformat()}">{moment.strftime("%Y-%m-%d %H:%M:%S")}</time>'


def _when_ago(ts: float | None, now: float) -> str:
    """A time and how long ago it was; "-" when it has not happened."""
    return "-" if ts is None else f"{_when(ts)} ({human_age(max(0.0, now - ts))} ago)"


def _state(job: Job) -> str:
    """The state badge; a parked job says so (the daemon leaves it alone until `batchd resume`)."""
    state = job.state.value
    parked = ' <span class="badge parked">parked</span>' if job.parked_at is not None else ""
    waits = f' title="waits: {_e(job.wait_reason)}"' if job.state is JobState.QUEUED and job.wait_reason else ""
    return f'<span class="badge s-{state}"{waits}>{state}</span>{parked}'


def _bar(percent: float | None) -> str:
    """A progress bar (a <progress> element, styled) and its figure; "-" when unknown."""
    if percent is None:
        return '<span class="muted">-</span>'
    shown = f"{int(percent)} %"
    return f'<progress max="100" value="{percent:.2f}" title="{shown} answered">{shown}</progress> <span>{shown}</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str, empty: str) -> str:
    """A table of already-escaped cells; `empty` (a sentence) when there is no row."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _document(title: str, main: str, now: float) -> str:
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · batchd</title>"
        '<link rel="stylesheet" href="/static/status.css"><script src="/static/refresh.js" defer></script>'
        f'</head><body data-refresh-s="{REFRESH_S}"><header><a class="home" href="/">batchd</a>'
        f'<span class="stamp">as of <span id="stamp">{stamp}</span></span></header>'
        f'<main id="live">{main}</main></body></html>'
    )


# ---------------------------------------------------------------- /


def _job_row(job: Job, batches: Sequence[RemoteBatchRecord], now: float) -> list[str]:
    counts = job.request_counts or {}
    total = counts.get("total", job.request_count)
    return [
        f'<a href="/jobs/{quote(job.id)}">{_e(job.name)}</a>',
        _state(job),
        _e(job.provider_name),
        _bar(progress_of(job, batches)),
        f'<span class="num">{_e(counts.get("completed"))}</span>',
        f'<span class="num">{_e(counts.get("failed"))}</span>',
        f'<span class="num">{_e(total)}</span>',
        _e(human_age(max(0.0, now - job.created_at))),
        # The daemon holding the job; an ended job's last owner no longer works on it.
        _e(None)
        if job.state.terminal or not job.owner
        else f'<code title="{_e(job.owner)}">{_e(job.owner[:8])}</code>',
    ]


def _filter_form(listing: Listing) -> str:
    chosen = listing.filter.state.value if listing.filter.state else ""
    total = sum(listing.counts.values())
    options = [f'<option value=""{" selected" if not chosen else ""}>every state ({total})</option>']
    for state in JobState:
        selected = " selected" if state.value == chosen else ""
        n = listing.counts.get(state.value, 0)
        options.append(f'<option value="{state.value}"{selected}>{state.value} ({n})</option>')
    return (
        '<form class="filter" method="get" action="/">'
        f'<label>State <select name="state">{"".join(options)}</select></label> '
        f'<label>Name <input type="search" name="q" value="{_e(listing.filter.search or "")}" '
        'placeholder="part of a name"></label> <button type="submit">Show</button>'
        + (' <a href="/">clear</a>' if chosen or listing.filter.search else "")
        + "</form>"
    )


def _shown_note(listing: Listing) -> str:
    n = len(listing.page.jobs)
    if listing.page.more:
        return f'<p class="note">The newest {n} matching jobs are shown; narrow the filter to find older ones.</p>'
    return f'<p class="note">{n} matching job{"s" if n != 1 else ""}.</p>'


def _daemon_rows(records: Sequence[dict[str, Any]]) -> Iterable[list[str]]:
    for d in records:
        yield [
            f'<code title="{_e(d["id"])}">{_e(d["id"][:8])}</code>',
            f'<span class="badge d-{_e(d["state"])}">{_e(d["state"])}</span>',
            _e(d["host"]),
            f'<span class="num">{_e(d["pid"])}</span>',
            f'<span class="num">{_e(d["jobs"])}</span>',
            f"{_e(human_age(d['heartbeat_age_s']))} ago",
            _e(d["started_at"]),
        ]


def _endpoint_rows(rows: Sequence[dict[str, Any]]) -> Iterable[list[str]]:
    for r in rows:
        if r["endpoint_disabled"]:
            health = f'<span class="badge bad" title="{_e(r["disabled_reason"])}">disabled</span>'
        elif r["dead"]:
            health = '<span class="badge warn">dead letters</span>'
        elif r["pending"] and r["last_error"]:
            health = '<span class="badge warn">retrying</span>'
        else:
            health = '<span class="badge good">ok</span>'
        kind = "config" if r["configured"] else ("spec" if r["kind"] == "spec" else "no longer configured")
        yield [
            f"<code>{_e(r['url'])}</code> <span class='muted'>({_e(kind)})</span>",
            health,
            *(f'<span class="num">{_e(r[k])}</span>' for k in ("pending", "delivered", "failed_attempts", "dead")),
            f'<span class="num">{_e(r["disabled"])}</span>',
            _e(r["next_attempt_at"]),
            _e(r["last_error"]),
        ]


_PERIODS = {"day": "today", "month": "this month"}


def _spend(listing: Listing) -> str:
    """Spend against the [budget] (estimated from [pricing]), when a budget is set."""
    parts = [
        f'{_PERIODS.get(period, period)}: <span class="num">${spent:,.2f}</span> of '
        f'<span class="num">${budget:,.2f}</span>'
        for period, spent, budget in listing.spend
    ]
    return f'<p class="spend">Spend (estimated, UTC) {" · ".join(parts)}</p>' if parts else ""


def listing_page(listing: Listing) -> str:
    """`/`: the filter, the newest matching jobs, the daemons, the webhook endpoints."""
    now = listing.now
    jobs = _table(
        ["Name", "State", "Provider", "Progress", "OK", "Failed", "Requests", "Age", "Owner"],
        (_job_row(j, listing.batches.get(j.id, []), now) for j in listing.page.jobs),
        cls="jobs",
        empty="No job matches." if listing.filter.state or listing.filter.search else "No job yet.",
    )
    daemons = _table(
        ["Daemon", "State", "Host", "PID", "Jobs", "Heartbeat", "Started"],
        _daemon_rows(listing.daemons),
        cls="daemons",
        empty="No daemon has run on this database.",
    )
    endpoints = _table(
        ["Endpoint", "Health", "Pending", "Delivered", "Failed attempts", "Dead", "Disabled", "Next attempt",
         "Last error"],
        _endpoint_rows(listing.endpoints),
        cls="endpoints",
        empty="No webhook endpoint: none configured, nothing sent.",
    )  # fmt: skip
    main = (
        f"<h1>Jobs</h1>{_spend(listing)}{_filter_form(listing)}{_shown_note(listing)}{jobs}"
        f"<h2>Daemons</h2>{daemons}<h2>Webhook endpoints</h2>{endpoints}"
    )
    return _document("jobs", main, now)


# ---------------------------------------------------------------- /jobs/ID


def _timeline(detail: JobDetail) -> list[tuple[float, str]]:
    """What the store recorded of the job, in time order: (when, what; escaped)."""
    job = detail.job
    moments: list[tuple[float, str]] = [(job.created_at, f"received <code>{_e(job.source)}</code>")]
    for b in detail.batches:
        where = f"round {b.round}, shard {b.shard}"
        moments.append((b.intent_at, f"{where}: intent to create a remote batch"))
        if b.remote_created_at is not None:
            moments.append((b.remote_created_at, f"{where}: remote batch <code>{_e(b.remote_id)}</code> created"))
        if b.stuck_at is not None:
            moments.append((b.stuck_at, f"{where}: found stuck (no progress since {_when(b.progress_at)}), cancelled"))
        moments.append((b.updated_at, f"{where}: last word {_e(b.status)}"))
    for event in detail.events:
        moments.append((event.created_at, f"webhook event <code>{_e(event.type)}</code> ({_e(event.id)})"))
    if job.parked_at is not None:
        moments.append((job.parked_at, f"parked: {_e(job.parked_reason)}"))
    if job.finished_at is not None:
        moments.append((job.finished_at, f"finished: {_state(job)}"))
    else:
        moments.append((job.updated_at, f"last change: now {_state(job)}"))
    return sorted(moments, key=lambda m: m[0])


def _batch_row(b: RemoteBatchRecord) -> list[str]:
    return [
        f'<span class="num">{b.round}</span>',
        f'<span class="num">{b.shard}</span>',
        f"<code>{_e(b.remote_id or '(not created)')}</code>",
        _e(b.status) + (" · stuck, cancelled by batchd" if b.stuck_at is not None else ""),
        _bar(b.progress),
        f'<span class="num">{_e(b.request_count)}</span>',
        f"<code>{_e(b.input_file_id)}</code>",
        f"<code>{_e(b.output_file_id)}</code>",
        f"<code>{_e(b.error_file_id)}</code>",
        _e(b.error),
    ]


def _delivery_row(d: Delivery, now: float) -> list[str]:
    when = (
        f"delivered {_when(d.delivered_at)}"
        if d.delivered_at is not None
        else (f"next attempt {_when(d.next_attempt_at)}" if d.state.value == "pending" else "-")
    )
    return [
        f"<code>{_e(d.event_type)}</code>",
        f"<code>{_e(redact_url(d.url))}</code>",
        f'<span class="badge w-{_e(d.state.value)}">{_e(d.state.value)}</span>',
        f'<span class="num">{d.attempts}</span>',
        _e(d.last_status),
        when,
        _e(d.last_error),
    ]


def _facts(detail: JobDetail) -> str:
    job = detail.job
    counts = job.request_counts or {}
    facts = [
        ("State", _state(job) + (" · cancel requested" if job.cancel_requested else "")),
        ("Progress", _bar(progress_of(job, detail.batches))),
        ("Requests", f"{_e(counts.get('total', job.request_count))} in the file; ok {_e(counts.get('completed'))}, "
                     f"failed {_e(counts.get('failed'))}"
                     + (f", of them unanswered {_e(counts['unanswered'])}" if "unanswered" in counts else "")),
        ("Provider", f"{_e(job.provider_name)} ({_e(job.provider)})"),
        ("Endpoint", f"<code>{_e(job.endpoint)}</code>"),
        ("Model", _e(job.model)),
        ("Source", f"<code>{_e(job.source)}</code>"),
        ("Id", f"<code>{_e(job.id)}</code>"),
        ("Owner", f"<code>{_e(job.owner)}</code>"),
        ("Round", _e(job.round)),
        ("Created", _when_ago(job.created_at, detail.now)),
        ("Finished", _when_ago(job.finished_at, detail.now)),
        ("Webhook URL", f"<code>{_e(redact_url(job.webhook_url))}</code>" if job.webhook_url else "-"),
        ("Metadata", f"<code>{_e(json.dumps(dict(job.metadata), ensure_ascii=False))}</code>"),
    ]  # fmt: skip
    problems = [
        ("Waits", job.wait_reason if job.state is JobState.QUEUED else None),
        ("Reason", job.reason),
        ("Parked", job.parked_reason if job.parked_at is not None else None),
        ("Last error", job.last_error),
        ("Source changed", job.source_changed),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    rows += "".join(f'<tr class="problem"><th>{k}</th><td>{_e(v)}</td></tr>' for k, v in problems if v)
    return f'<table class="facts">{rows}</table>'


def _files(detail: JobDetail) -> str:
    job = detail.job
    named = [
        ("claimed", job.claimed_path), ("spec", job.spec_path), ("upload", job.upload_path),
        ("outbox", job.outbox_path), *(("outbox file", path) for path in detail.outbox_files),
        ("report", job.report_path), ("rejected", job.rejected_path),
    ]  # fmt: skip
    return _table(
        ["File", "Path"], ([_e(k), f"<code>{_e(v)}</code>"] for k, v in named if v), cls="files", empty="No file."
    )


def job_page(detail: JobDetail) -> str:
    """`/jobs/ID`: the job's facts, timeline, remote batches, files and webhook deliveries."""
    job, now = detail.job, detail.now
    timeline = "".join(f"<li>{_when(ts)} <span>{what}</span></li>" for ts, what in _timeline(detail))
    batches = _table(
        ["Round", "Shard", "Remote batch", "Status", "Progress", "Requests", "Input file", "Output file",
         "Error file", "Error"],
        (_batch_row(b) for b in detail.batches),
        cls="batches",
        empty="No remote batch yet.",
    )  # fmt: skip
    deliveries = _table(
        ["Event", "Endpoint", "State", "Attempts", "Last status", "When", "Last error"],
        (_delivery_row(d, now) for d in detail.deliveries),
        cls="deliveries",
        empty="No webhook delivery (events are sent when a job ends).",
    )
    main = (
        f'<p class="crumbs"><a href="/">jobs</a> / {_e(job.name)}</p><h1>{_e(job.name)}</h1>{_facts(detail)}'
        f'<h2>Timeline</h2><ol class="timeline">{timeline}</ol>'
        f"<h2>Remote batches</h2>{batches}<h2>Files</h2>{_files(detail)}"
        f"<h2>Webhook deliveries</h2>{deliveries}"
        '<p class="note">Each delivery shows its latest attempt: the store keeps the count of attempts, '
        "the last status and error.</p>"
    )
    return _document(job.name, main, now)


def not_found_page(job_id: str, now: float) -> str:
    return _document("not found", f'<h1>No job {_e(job_id)}</h1><p><a href="/">All jobs</a></p>', now)
