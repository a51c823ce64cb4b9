"""What every `batchd` command shares: the config, failing, and the database.

Exit codes: 0 success; 1 the operation failed (invalid file, job not found,
lock held, timeout); 2 usage or configuration error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from batchd.config import ConfigError, NoConfigFound, Settings, load_settings, parse_override
from batchd.models import Job
from batchd.outbox import iso
from batchd.store import Store, StoreUnavailable, open_existing
from batchd.text import counted

CONFIG_HELP = "Config file (else $BATCHD_CONFIG, else /etc/batchd/batchd.toml)."


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `batchd: message` on stderr and exit with `code` (1 failed, 2 usage or configuration)."""
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
        except NoConfigFound as exc:
            fail(str(exc), 2)
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


@contextmanager
def open_store(settings: Settings) -> Iterator[Store]:
    """The Store for commands that write: migrated (so created) first."""
    store = Store(settings.database_url)
    try:
        try:
            store.migrate()
        except StoreUnavailable as exc:
            fail(str(exc), 1)
        yield store
    finally:
        store.close()


@contextmanager
def read_store(settings: Settings) -> Iterator[Store | None]:
    """The Store for reading, or None when there is no database yet (nothing is created).

    The operator commands that only read (`jobs`, `show`, `watch`, `status`) never
    migrate nor create the database: a `sudo batchd jobs` must not leave a root-owned
    database behind. SQLite's WAL lets them read while the daemon writes.
    """
    try:
        store = open_existing(settings.database_url)
    except StoreUnavailable as exc:
        fail(str(exc), 1)
    if store is None:
        yield None
        return
    try:
        yield store
    finally:
        store.close()


def find_job(store: Store, ref: str) -> Job:
    """The one job `ref` names (an id, a unique id prefix or a name); fails (1) on none or several.

    Several jobs may share a name (a file dropped again, a retry): picking the newest silently
    would act on a job the user did not mean, so the candidates are listed instead.
    """
    found = store.jobs.find(ref)
    if not found:
        fail(f"no job matches {ref!r}", 1)
    if len(found) > 1 and found[0].id != ref:
        click.echo(f"batchd: {ref!r} matches {counted(len(found), 'job')}; name one by its id:", err=True)
        for job in found[:20]:
            click.echo(f"  {job.short_id}  {job.state.value:<11}  {iso(job.created_at)}  {job.name}", err=True)
        if len(found) > 20:
            click.echo(f"  … and {len(found) - 20:,} more", err=True)
        sys.exit(1)
    return found[0]
