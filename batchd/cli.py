"""The `batchd` command line (DESIGN §7): parsing and printing only.

Exit codes: 0 success; 1 the operation failed (invalid file, job not found,
lock held, timeout); 2 usage or configuration error.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import click

from batchd import logs as batchd_logging
from batchd.config import ConfigError, Settings, load_settings, parse_override
from batchd.models import PROVIDER_LIMITS, Job
from batchd.store import Store, StoreUnavailable
from batchd.validation import format_report, validate_file

CONFIG_HELP = "Config file (else $BATCHD_CONFIG, else /etc/batchd/batchd.toml)."


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"batchd: {message}", err=True)
    sys.exit(code)


class Context:
    """What every command shares: where the config is and the --set overrides."""

    def __init__(self, config: str | None, overrides: tuple[str, ...]) -> None:
        self.config = config
        self.overrides = overrides

    def load(self) -> Settings:
        try:
            return load_settings(self.config, overrides=dict(parse_override(o) for o in self.overrides))
        except ConfigError as exc:
            fail(f"configuration error: {exc}", 2)

    def loader(self) -> Callable[[], Settings]:
        """Re-reads the config (SIGHUP); raises ConfigError instead of exiting."""
        return lambda: load_settings(self.config, overrides=dict(parse_override(o) for o in self.overrides))


pass_ctx = click.make_pass_decorator(Context)


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --set on every command, so they may come before or after the command name."""

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        obj = ctx.find_object(Context)
        if obj is not None:
            if param.name == "config" and value:
                obj.config = value
            if param.name == "overrides" and value:
                obj.overrides = obj.overrides + tuple(value)
        return value

    fn = click.option(
        "--config", "config", type=click.Path(dir_okay=False), envvar=None, help=CONFIG_HELP,
        callback=remember, expose_value=False,
    )(fn)  # fmt: skip
    fn = click.option(
        "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
        help="Override one config key (beats BATCHD_* and the file).", callback=remember, expose_value=False,
    )(fn)  # fmt: skip
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key.")
@click.version_option(package_name="batchd")
@click.pass_context
def main(ctx: click.Context, config: str | None, overrides: tuple[str, ...]) -> None:
    """batchd: a folder-driven, durable batch-inference service."""
    ctx.obj = Context(config, overrides)


@contextmanager
def open_store(settings: Settings) -> Iterator[Store]:
    store = Store(settings.database_url)
    try:
        try:
            store.migrate()
        except StoreUnavailable as exc:
            fail(str(exc), 1)
        yield store
    finally:
        store.close()


# ---------------------------------------------------------------- run


@main.command()
@click.option("--once", is_flag=True, help="One rescan, then run until every job is terminal and every event sent.")
@click.option("--timeout", type=float, help="With --once: give up after S seconds (exit 1).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@config_options
@pass_ctx
def run(obj: Context, once: bool, timeout: float | None, log_level: str) -> None:
    """Run the daemon in the foreground (systemd's ExecStart)."""
    from batchd.memory import limit_malloc_arenas
    from batchd.service import LockHeld, serve

    if timeout is not None and not once:
        fail("--timeout needs --once", 2)
    settings = obj.load()
    batchd_logging.configure(level=log_level)
    limit_malloc_arenas()
    try:
        code = anyio.run(lambda: serve(settings, once=once, timeout=timeout, reload=obj.loader()))
    except (LockHeld, StoreUnavailable) as exc:
        fail(str(exc), 1)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)
    sys.exit(code)


# ---------------------------------------------------------------- files


def _limits_settings(obj: Context) -> Settings | None:
    """Settings when a config can be read; validation falls back to the local limits otherwise."""
    try:
        return obj.loader()()
    except ConfigError:
        if obj.config or os.environ.get("BATCHD_CONFIG"):
            raise
        return None


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@config_options
@pass_ctx
def validate(obj: Context, file: Path, as_json: bool) -> None:
    """Check FILE against every inbox rule: 0 valid, 1 invalid."""
    try:
        settings = _limits_settings(obj)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)
    if not file.is_file():
        fail(f"{file}: no such file", 2)
    kind = settings.provider.kind if settings else "local"
    report = validate_file(file, source=file.name, limits=PROVIDER_LIMITS[kind])
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    elif report.ok:
        click.echo(f"{file}: valid, {report.request_count} requests for {report.endpoint}")
    else:
        click.echo(format_report(report), nl=False)
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", help="Name of the submission (default: the file's name without its extension).")
@config_options
@pass_ctx
def submit(obj: Context, file: Path, name: str | None) -> None:
    """Validate FILE, then drop it atomically into the inbox as NAME.jsonl."""
    settings = obj.load()
    if not file.is_file():
        fail(f"{file}: no such file", 2)
    report = validate_file(file, source=file.name, limits=PROVIDER_LIMITS[settings.provider.kind])
    if not report.ok:
        click.echo(format_report(report), nl=False, err=True)
        sys.exit(1)
    name = name or file.stem
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        fail(f"--name {name!r}: a plain file name is needed", 2)
    inbox = settings.inbox_dir
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / f"{name}.jsonl"
    if target.exists():
        fail(f"{target} is already waiting in the inbox; choose another --name", 1)
    # Write under an ignored name, then rename: the daemon sees only a complete file.
    tmp = inbox / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(file, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.rename(tmp, target)
    click.echo(f"submitted {file} as {target} ({report.request_count} requests)")


# ---------------------------------------------------------------- jobs


def _find(store: Store, ref: str) -> Job:
    found = store.find_jobs(ref)
    if not found:
        fail(f"no job matches {ref!r}", 1)
    if len(found) > 1 and found[0].id != ref and len({j.name for j in found}) > 1:
        fail(f"{ref!r} matches {len(found)} jobs: {', '.join(j.short_id for j in found[:5])}", 1)
    return found[0]


@main.command()
@click.argument("job_ref", metavar="JOB")
@config_options
@pass_ctx
def cancel(obj: Context, job_ref: str) -> None:
    """Ask the daemon to cancel JOB; results so far are still downloaded."""
    settings = obj.load()
    with open_store(settings) as store:
        job = _find(store, job_ref)
        if job.state.terminal:
            fail(f"job {job.short_id} is already {job.state.value}", 1)
        store.update_job(job.id, cancel_requested=True)
    click.echo(f"cancel requested for {job.short_id} ({job.name})")


@main.command()
@click.argument("job_ref", metavar="JOB")
@config_options
@pass_ctx
def retry(obj: Context, job_ref: str) -> None:
    """Submit a finished job's failed and unanswered requests again, as a new job (its own outbox folder)."""
    from batchd.resubmit import NothingToRetry, retry_job

    settings = obj.load()
    with open_store(settings) as store:
        job = _find(store, job_ref)
        try:
            new = retry_job(store, settings, job)
        except NothingToRetry as exc:
            fail(str(exc), 1)
    click.echo(f"retrying {new.request_count} requests of {job.short_id} as new job {new.short_id}")


# ---------------------------------------------------------------- emulator and demo


def _fault_statuses(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int | str, ...]:
    """`429,500,503,drop` → (429, 500, 503, "drop")."""
    parsed: list[int | str] = []
    for item in (part.strip() for part in value.split(",")):
        if item == "drop":
            parsed.append(item)
        elif item.isdigit() and 400 <= int(item) <= 599:
            parsed.append(int(item))
        else:
            raise click.BadParameter(f"{item!r} is neither an HTTP status from 400 to 599 nor 'drop'")
    return tuple(parsed)


SECONDS = click.FloatRange(min=0.0)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, type=int, show_default=True, help="0: any free port (the log names it).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: ./batchd-emulator")
@click.option(
    "--api-key", envvar="BATCHD_EMULATOR_API_KEY", show_envvar=True,
    help="Accept only this bearer token (default: any non-empty one).",
)  # fmt: skip
@click.option("--upstream-url", help="Forward each request to this OpenAI-compatible server (default: echo replies).")
@click.option(
    "--upstream-api-key", envvar="BATCHD_EMULATOR_UPSTREAM_API_KEY", show_envvar=True,
    help="Bearer token for the upstream server.",
)  # fmt: skip
@click.option(
    "--concurrency", default=16, type=click.IntRange(min=1), show_default=True,
    help="Requests in flight to the upstream server at once.",
)  # fmt: skip
@click.option("--validating-s", default=0.0, type=SECONDS, help="Seconds a new batch stays validating, at least.")
@click.option("--in-progress-s", default=0.0, type=SECONDS, help="Seconds a batch stays in progress, at least.")
@click.option("--finalizing-s", default=0.0, type=SECONDS, help="Seconds a batch stays finalizing.")
@click.option("--cancelling-s", default=0.0, type=SECONDS, help="Seconds a cancelled batch stays cancelling.")
@click.option("--latency", default=0.0, type=SECONDS, help="Seconds added to every API request (a slow network).")
@click.option(
    "--fault-rate", default=0.0, type=click.FloatRange(0.0, 1.0), show_default=True,
    help="Fraction of API requests answered with a random fault from --fault-statuses.",
)  # fmt: skip
@click.option(
    "--fault-statuses", default="429,500,503", show_default=True, callback=_fault_statuses,
    help="Comma-separated HTTP statuses for --fault-rate; 'drop' closes the connection without an answer.",
)  # fmt: skip
@click.option("--fault-retry-after", type=SECONDS, help="Retry-After (seconds) sent with every random fault.")
@click.option("--fault-seed", type=int, help="Seed of the random faults: the same requests get the same faults.")
def emulator(
    host: str,
    port: int,
    data_dir: Path | None,
    api_key: str | None,
    upstream_url: str | None,
    upstream_api_key: str | None,
    concurrency: int,
    validating_s: float,
    in_progress_s: float,
    finalizing_s: float,
    cancelling_s: float,
    latency: float,
    fault_rate: float,
    fault_statuses: tuple[int | str, ...],
    fault_retry_after: float | None,
    fault_seed: int | None,
) -> None:
    """The embedded Batch API on its own: Together dialect at /v1/, OpenAI dialect at /openai/v1/."""
    from batchd.emulator.faults import RandomFaults
    from batchd.emulator.server import run_emulator
    from batchd.emulator.timeline import Timeline

    batchd_logging.configure()
    random_faults = None
    if fault_rate > 0:
        random_faults = RandomFaults(fault_rate, fault_statuses, retry_after=fault_retry_after, seed=fault_seed)
    run_emulator(
        host,
        port,
        data_dir or Path("batchd-emulator"),
        api_key=api_key or None,
        upstream_url=upstream_url or None,
        upstream_api_key=upstream_api_key or None,
        concurrency=concurrency,
        timeline=Timeline(validating_s, in_progress_s, finalizing_s, cancelling_s),
        random_faults=random_faults,
        latency_s=latency,
    )


@main.command()
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), help="Use (and keep) this folder.")
def demo(keep: Path | None) -> None:
    """A complete tour on the local backend: no key, no network."""
    from batchd.demo import run_demo

    sys.exit(run_demo(keep))


# ---------------------------------------------------------------- operator commands (cli_ops.py)
# Last, because those modules use the helpers above; importing cli_webhooks registers `batchd webhooks`.
from batchd import cli_ops, cli_webhooks  # noqa: E402, F401

for _command in cli_ops.commands():
    main.add_command(_command)
