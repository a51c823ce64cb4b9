"""`batchd run`: the daemon in the foreground."""

from __future__ import annotations

import sys

import anyio
import click

from batchd import logs
from batchd.cli.common import Context, config_options, fail, pass_ctx
from batchd.config import ConfigError
from batchd.store import StoreUnavailable


@click.command()
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
    logs.configure(level=log_level)
    limit_malloc_arenas()
    try:
        code = anyio.run(lambda: serve(settings, once=once, timeout=timeout, reload=obj.loader()))
    except (LockHeld, StoreUnavailable) as exc:
        fail(str(exc), 1)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)
    sys.exit(code)
