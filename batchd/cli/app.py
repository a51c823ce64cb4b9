"""The top-level `batchd` group: every command, added here and only here."""

from __future__ import annotations

import click

from batchd.cli.common import CONFIG_HELP, Context
from batchd.cli.emulator import demo, emulator
from batchd.cli.files import submit, validate
from batchd.cli.init import init
from batchd.cli.jobs import cancel, jobs, resume, retry, show, status, watch
from batchd.cli.run import run
from batchd.cli.webhooks import webhooks


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    commands=[init, run, validate, submit, jobs, show, watch, status, cancel, resume, retry, webhooks, emulator, demo],
)
@click.option("--config", "config", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key.")
@click.version_option(package_name="batchd")
@click.pass_context
def main(ctx: click.Context, config: str | None, overrides: tuple[str, ...]) -> None:
    """batchd: a folder-driven, durable batch-inference service."""
    ctx.obj = Context(config, overrides)
