"""Operator commands on jobs: `jobs`, `show`, `watch`, `status` read; `cancel`, `retry` act.

The readers open the database with `read_store` (never creating it) beside a running
daemon; human output is a table, `--json` output the stable shape documented in the
docs/reference/json.md. `cancel` and `retry` write to the Store, and the daemon
acts on it.
"""

from __future__ import annotations

import json
import sys
import time

import click

from batchd.cli.common import Context, config_options, fail, find_job, open_store, pass_ctx, read_store
from batchd.cli.records import (
    daemon_records,
    daemons_table,
    job_batches,
    jobs_table,
    read_records,
    show_lines,
    show_record,
)
from batchd.models import JobState
from batchd.store import StaleState
from batchd.text import counted

IN_FLIGHT_STATES = [s for s in JobState if not s.terminal]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (shape: docs/reference/json.md).")
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in JobState]), help="Only these.")
@config_options
@pass_ctx
def jobs(obj: Context, as_json: bool, states: tuple[str, ...]) -> None:
    """What is tracked, oldest first: name, state, progress, requests ok/failed, age."""
    settings = obj.load()
    with read_store(settings) as store:
        records = read_records(store, [JobState(s) for s in states], time.time()) if store else []
    if as_json:
        click.echo(json.dumps(records, indent=2, ensure_ascii=False))
    elif not records:
        click.echo("no jobs")
    else:
        click.echo("\n".join(jobs_table(records)))


@click.command()
@click.argument("job_ref", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (shape: docs/reference/json.md).")
@config_options
@pass_ctx
def show(obj: Context, job_ref: str, as_json: bool) -> None:
    """Everything about one job (JOB: an id, a unique id prefix or a name)."""
    settings = obj.load()
    with read_store(settings) as store:
        if store is None:
            fail(f"no job matches {job_ref!r}", 1)
        job = find_job(store, job_ref)
        record = show_record(job, job_batches(store, job), store.deliveries.select(job_id=job.id), time.time())
    if as_json:
        click.echo(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        click.echo("\n".join(show_lines(record)))


@click.command()
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@config_options
@pass_ctx
def watch(obj: Context, interval: float, once: bool) -> None:
    """Live progress of the jobs in flight, until Ctrl-C (or --once).

    On a terminal the screen is redrawn; otherwise one snapshot is printed per interval.
    """
    settings = obj.load()
    redraw = sys.stdout.isatty() and not once
    try:
        while True:
            now = time.time()
            with read_store(settings) as store:
                records = read_records(store, IN_FLIGHT_STATES, now) if store else []
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            header = f"{stamp}  {counted(len(records), 'job')} in flight"
            body = jobs_table(records, bar=20) if records else []
            if redraw:
                # Home, clear the screen, draw: no scrollback of old frames.
                click.echo("\x1b[H\x1b[2J" + "\n".join([header, *body]))
            else:
                click.echo("\n".join([header, *body, ""]))
            if once:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--all", "show_all", is_flag=True, help="Also daemons that stopped.")
@config_options
@pass_ctx
def status(obj: Context, as_json: bool, show_all: bool) -> None:
    """The daemons working on this database: their heartbeats and the jobs each holds."""
    settings = obj.load()
    with read_store(settings) as store:
        rows = store.cluster.daemons() if store else []
    records = daemon_records(rows, settings.cluster.lease_s, time.time())
    if not show_all:
        records = [r for r in records if r["state"] != "stopped"]
    if as_json:
        click.echo(json.dumps(records, indent=2))
    elif not records:
        click.echo("no daemon is running")
    else:
        click.echo("\n".join(daemons_table(records)))


@click.command()
@click.argument("job_ref", metavar="JOB")
@config_options
@pass_ctx
def cancel(obj: Context, job_ref: str) -> None:
    """Ask the daemon to cancel JOB; results so far are still downloaded."""
    settings = obj.load()
    with open_store(settings) as store:
        job = find_job(store, job_ref)
        if job.state.terminal:
            fail(f"job {job.short_id} is already {job.state.value}", 1)
        try:
            store.jobs.request_cancel(job.id)
        except StaleState:
            fail(f"job {job.short_id} has ended meanwhile", 1)
    click.echo(f"cancel requested for {job.short_id} ({job.name})")


@click.command()
@click.argument("job_ref", metavar="JOB")
@config_options
@pass_ctx
def resume(obj: Context, job_ref: str) -> None:
    """Take up a parked job again (parked after repeated unexpected errors; `batchd show` says why)."""
    settings = obj.load()
    with open_store(settings) as store:
        job = find_job(store, job_ref)
        try:
            store.jobs.resume(job.id)
        except StaleState:
            fail(f"job {job.short_id} is not parked ({job.state.value})", 1)
    click.echo(f"resumed {job.short_id} ({job.name}); the daemon takes it up at its next look")


@click.command()
@click.argument("job_ref", metavar="JOB")
@config_options
@pass_ctx
def retry(obj: Context, job_ref: str) -> None:
    """Submit a finished job's failed and unanswered requests again, as a new job (its own outbox folder)."""
    from batchd.resubmit import NothingToRetry, retry_job

    settings = obj.load()
    with open_store(settings) as store:
        job = find_job(store, job_ref)
        try:
            new = retry_job(store, settings, job)
        except NothingToRetry as exc:
            fail(str(exc), 1)
    click.echo(f"retrying {counted(new.request_count or 0, 'request')} of {job.short_id} as new job {new.short_id}")
