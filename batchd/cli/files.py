"""`batchd validate` and `batchd submit`: a request file checked, and dropped into the inbox."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import click

from batchd.cli.common import Context, config_options, fail, pass_ctx
from batchd.config import ConfigError, Settings
from batchd.models import PROVIDER_LIMITS
from batchd.validation import format_report, validate_file


def _limits_settings(obj: Context) -> Settings | None:
    """Settings when a config can be read; validation falls back to the local limits otherwise."""
    try:
        return obj.loader()()
    except ConfigError:
        if obj.config or os.environ.get("BATCHD_CONFIG"):
            raise
        return None


@click.command()
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
    limits = settings.provider.validation_limits if settings else PROVIDER_LIMITS["local"]
    dialect = settings.provider.kind if settings else "local"
    report = validate_file(file, source=file.name, limits=limits, dialect=dialect)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    elif report.ok:
        click.echo(f"{file}: valid, {report.request_count} requests for {report.endpoint}")
    else:
        click.echo(format_report(report), nl=False)
    sys.exit(0 if report.ok else 1)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", help="Name of the submission (default: the file's name without its extension).")
@config_options
@pass_ctx
def submit(obj: Context, file: Path, name: str | None) -> None:
    """Validate FILE, then drop it atomically into the inbox as NAME.jsonl."""
    settings = obj.load()
    if not file.is_file():
        fail(f"{file}: no such file", 2)
    report = validate_file(
        file, source=file.name, limits=settings.provider.validation_limits, dialect=settings.provider.kind
    )
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
