"""`batchd webhooks`: what deliveries are doing, and the operator's levers on them (DESIGN §5, §7).

Parsing and printing only: the Store does the work. Every command takes --config;
exit codes 0 success, 1 the operation failed, 2 usage or configuration error.
The daemon need not be stopped: it reads the store at least once a second and
acts on what these commands change there.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import anyio
import click

from batchd.cli.common import Context, config_options, fail, find_job, open_store, pass_ctx
from batchd.cli.records import endpoint_rows
from batchd.config import Secret, Settings
from batchd.models import StoredEvent
from batchd.store import Store
from batchd.urls import redact_url
from batchd.webhooks import Outcome, new_event, post_event

#: The answer's first bytes that `batchd webhooks test` shows by default.
TEST_PEEK_BYTES = 200


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (one object per endpoint).")
@config_options
@pass_ctx
def webhooks(obj: Context, as_json: bool) -> None:
    """Deliveries per endpoint: pending, delivered, failed attempts, dead, disabled."""
    if click.get_current_context().invoked_subcommand is not None:
        if as_json:
            fail("--json belongs to `batchd webhooks` alone", 2)
        return
    settings = obj.load()
    with open_store(settings) as store:
        rows = endpoint_rows(settings, store.deliveries.endpoint_stats())
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo("no webhook endpoints: none configured, nothing sent")
        return
    click.echo(f"{'STATE':<9} {'PENDING':>7} {'DELIVERED':>9} {'FAILED':>6} {'DEAD':>5} {'DISABLED':>8}  URL")
    for row in rows:
        state = "disabled" if row["endpoint_disabled"] else "active"
        click.echo(
            f"{state:<9} {row['pending']:>7} {row['delivered']:>9} {row['failed_attempts']:>6} {row['dead']:>5} "
            f"{row['disabled']:>8}  {row['url']}"
            + ("" if row["configured"] or row["kind"] == "spec" else "  (no longer configured)")
        )
        if row["endpoint_disabled"]:
            click.echo(f"{'':<10}disabled since {row['disabled_at']}: {row['disabled_reason']}")
        if row["pending"]:
            click.echo(f"{'':<10}next attempt {row['next_attempt_at']}; last error: {row['last_error'] or '-'}")


# ---------------------------------------------------------------- replay


@webhooks.command()
@click.argument("event_id", required=False)
@click.option("--job", "job_ref", metavar="JOB", help="Every event of JOB (an id, a unique id prefix or a name).")
@click.option("--url", help="Only to this URL: one the event went to, or a configured [[webhooks]] url.")
@config_options
@pass_ctx
def replay(obj: Context, event_id: str | None, job_ref: str | None, url: str | None) -> None:
    """Send an event again: the same webhook-id and the same body bytes, due now.

    Works for delivered, dead and pending events alike; the running daemon sends it
    within a second (else the next `batchd run` does). Exit 1 when some endpoint was
    skipped (disabled, no longer configured), each named on stderr.
    """
    if (event_id is None) == (job_ref is None):
        fail("name one EVENT_ID or --job JOB", 2)
    settings = obj.load()
    complete = True
    with open_store(settings) as store:
        if event_id is not None:
            event = store.deliveries.get_event(event_id)
            if event is None:
                fail(f"no event {event_id!r}", 1)
            found = [event]
        else:
            assert job_ref is not None
            job = find_job(store, job_ref)
            found = store.deliveries.job_events(job.id)
            if not found:
                fail(f"job {job.short_id} ({job.name}) has no webhook events", 1)
        for event in found:
            complete = _replay_one(settings, store, event, url) and complete
    if not complete:
        sys.exit(1)


def full_url(given: str, known: Iterable[str]) -> str:
    """The URL an operator named: as given, or the one known URL whose redacted form it is.

    Every table shows URLs with their credentials hidden (batchd.urls.redact_url); a URL
    copied from one names its endpoint as long as no other URL looks the same redacted.
    """
    known = set(known)
    if given in known:
        return given
    matches = {url for url in known if redact_url(url) == given}
    return matches.pop() if len(matches) == 1 else given


def _replay_one(settings: Settings, store: Store, event: StoredEvent, url: str | None) -> bool:
    """Queue one event again for its endpoints (or `url`) and print what was done; False if one was skipped."""
    targets = {d.url: d.secret_ref for d in store.deliveries.select(event_id=event.id)}
    configured = {ep.url for ep in settings.webhooks}
    if url is not None:
        url = full_url(url, [*targets, *configured])
        if url in targets:
            targets = {url: targets[url]}
        elif url in configured:
            targets = {url: "config"}  # an endpoint added since, or whose filter left this event out
        else:
            shown = redact_url(url)
            click.echo(f"{event.id}: never sent to {shown}, and it is not a configured [[webhooks]] url", err=True)
            return False
    if not targets:
        click.echo(f"{event.id}: no endpoint to send it to (pass --url a configured endpoint)", err=True)
        return False
    disabled = store.deliveries.disabled_endpoints()
    sendable = []
    for target, secret_ref in targets.items():
        shown = redact_url(target)
        if target in disabled:
            click.echo(
                f"{event.id} -> {shown}: skipped, the endpoint is disabled ({disabled[target]}); "
                "`batchd webhooks enable URL` resumes it",
                err=True,
            )
        elif secret_ref == "config" and target not in configured:
            click.echo(f"{event.id} -> {shown}: skipped, no longer a configured [[webhooks]] url", err=True)
        elif secret_ref == "inbox" and not settings.inbox.webhook_secrets:
            click.echo(f"{event.id} -> {shown}: skipped, no [inbox] webhook secret to sign it with", err=True)
        else:
            sendable.append((target, secret_ref))
    if sendable:
        done = store.deliveries.replay_event(event.id, sendable)
        for target, how in done.items():
            said = "queued again" if how == "queued" else "was still pending, now due"
            click.echo(f"{event.id} ({event.type}) -> {redact_url(target)}: {said}")
    return len(sendable) == len(targets)


# ---------------------------------------------------------------- enable


@webhooks.command()
@click.argument("url")
@config_options
@pass_ctx
def enable(obj: Context, url: str) -> None:
    """Enable URL again after it answered 410 Gone; its parked deliveries become due now.

    URL as configured, or as `batchd webhooks` shows it (credentials hidden) when that names
    one disabled endpoint.
    """
    settings = obj.load()
    with open_store(settings) as store:
        url = full_url(url, store.deliveries.disabled_endpoints())
        resumed = store.deliveries.enable_endpoint(url)
        disabled = sorted(redact_url(u) for u in store.deliveries.disabled_endpoints())
    if resumed is None:
        known = f" (disabled: {', '.join(disabled)})" if disabled else " (no endpoint is disabled)"
        fail(f"{redact_url(url)} is not disabled{known}", 1)
    count = f"{resumed} parked {'delivery is' if resumed == 1 else 'deliveries are'}"
    click.echo(f"enabled {redact_url(url)}; {count} due now")


# ---------------------------------------------------------------- test


@webhooks.command(name="test")
@click.argument("url")
@click.option(
    "--bytes", "peek", default=TEST_PEEK_BYTES, show_default=True, type=click.IntRange(0, 65536),
    help="How much of the answer's body to show.",
)  # fmt: skip
@config_options
@pass_ctx
def test_command(obj: Context, url: str, peek: int) -> None:
    """Send a signed `batchd.test` event to URL now and show the answer (0 on a 2xx, else 1).

    A [[webhooks]] url is signed with its own secrets; any other URL with the [inbox]
    webhook secret, and it must pass what a spec's webhook_url must pass (the allow-list,
    the check of the addresses its host resolves to).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"{redact_url(url)!r}: an http:// or https:// URL is needed", 2)
    settings = obj.load()
    url = full_url(url, (ep.url for ep in settings.webhooks))
    endpoint = next((ep for ep in settings.webhooks if ep.url == url), None)
    if endpoint is not None:
        secrets, allow_list, how = endpoint.secrets, None, "its [[webhooks]] entry"
    elif settings.inbox.webhook_secrets:
        secrets, allow_list = settings.inbox.webhook_secrets, settings.inbox.allow_webhook_urls
        how = "the [inbox] webhook secret, checked as a spec's webhook_url"
    else:
        no_secret = "is not a [[webhooks]] url and no [inbox] webhook secret is set: nothing to sign with"
        fail(f"{redact_url(url)} {no_secret}", 1)
    now = time.time()
    event_id, body = new_event("batchd.test", {"message": "a test event from `batchd webhooks test`"}, now=now)
    click.echo(f"POST {redact_url(url)}")
    click.echo(f"  event {event_id} (batchd.test), signed with {len(secrets)} secret(s) of {how}")
    started = time.monotonic()
    outcome = anyio.run(_send_test, url, event_id, body, secrets, settings, allow_list, peek)
    elapsed_ms = (time.monotonic() - started) * 1000
    if outcome.status is None:
        click.echo(f"  no answer after {elapsed_ms:.0f} ms: {outcome.error}")
        sys.exit(1)
    click.echo(f"  answer: HTTP {outcome.status} in {elapsed_ms:.0f} ms")
    if outcome.retry_after is not None:
        click.echo(f"  retry-after: {outcome.retry_after:g} s")
    if outcome.excerpt:
        text = outcome.excerpt.decode("utf-8", "replace")
        shown = "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)
        click.echo(f"  body (first {len(outcome.excerpt)} bytes):")
        for line in shown.splitlines() or [""]:
            click.echo(f"    {line}")
    sys.exit(0 if 200 <= outcome.status < 300 else 1)


async def _send_test(
    url: str,
    event_id: str,
    body: bytes,
    secrets: tuple[Secret, ...],
    settings: Settings,
    allow_list: tuple[str, ...] | None,
    peek: int,
) -> Outcome:

    from batchd.webhooks.transport import webhook_client

    async with webhook_client() as http:
        return await post_event(
            http, url, event_id=event_id, body=body, secrets=secrets, timestamp=int(time.time()),
            timeout_s=settings.delivery.timeout_s, allow_list=allow_list, peek=peek,
        )  # fmt: skip
