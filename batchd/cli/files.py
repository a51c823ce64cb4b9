"""`batchd validate` and `batchd submit`: a request file or a spec checked, and dropped into the inbox.

A spec (`NAME.json`) names its data file relative to the inbox. Outside the inbox,
`validate` and `submit` read that path relative to the spec's own folder: a user
prepares `job.json` beside `data/job.jsonl` exactly as the two will sit in the inbox.
Both are checked by the inbox's own rules (the same functions), so what passes here
is taken there, with the provider the spec names.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import click

from batchd.cli.common import Context, config_options, fail, pass_ctx
from batchd.config import ConfigError, NoConfigFound, Settings, default_settings
from batchd.rejections import Rejection
from batchd.safe_fs import NotRegularFile, open_folder
from batchd.specs import Spec, batch_model, input_path, read_spec
from batchd.text import counted
from batchd.validation import Report, format_report, validate_file


@dataclass(frozen=True)
class Checked:
    """A file that passed: its report, and for a spec the spec and its data file."""

    report: Report
    spec: Spec | None = None
    data: Path | None = None


def _is_spec(file: Path) -> bool:
    return file.suffix == ".json"


def check(file: Path, settings: Settings) -> Checked:
    """Validate a request file or a spec with its data; raises Rejection naming what is wrong."""
    if not _is_spec(file):
        provider = settings.provider
        batch_model(provider, None, file.name)
        report = validate_file(file, source=file.name, limits=provider.validation_limits, dialect=provider.kind)
        return Checked(report)
    spec = read_spec(file, settings)
    data = input_path(file.parent, file.name, spec)
    named = settings.provider_named(spec.provider)
    assert named is not None  # read_spec refused a provider that is not configured
    batch_model(named, spec, file.name)
    report = validate_file(data, source=spec.input, limits=named.validation_limits, dialect=named.kind)
    return Checked(report, spec, data)


def _check_or_exit(file: Path, settings: Settings, *, as_json: bool = False, err: bool = False) -> Checked:
    """`check`, with a rejection printed (as JSON, or as text on stdout or `err`) and exit 1."""
    if not file.is_file():
        fail(f"{file}: no such file", 2)
    try:
        checked = check(file, settings)
    except (Rejection, NotRegularFile) as exc:
        problem = exc if isinstance(exc, Rejection) else None
        if as_json and problem is not None:
            click.echo(json.dumps(problem.details.as_dict(), indent=2, ensure_ascii=False))
        elif problem is not None:
            click.echo(problem.report, nl=False, err=err)
        else:
            fail(f"{file}: {exc} (symlinks are not followed)", 1)
        sys.exit(1)
    report = checked.report
    if as_json:
        click.echo(json.dumps(_json_report(file, checked), indent=2, ensure_ascii=False))
    elif not report.ok:
        prefix = f"{file.name}: its input {checked.spec.input} is not valid\n\n" if checked.spec else ""
        click.echo(prefix + format_report(report), nl=False, err=err)
    if not report.ok:
        sys.exit(1)
    return checked


def _json_report(file: Path, checked: Checked) -> dict[str, object]:
    shape = checked.report.as_dict()
    if checked.spec is not None:
        # A spec's report is its data's, with the spec named beside it.
        shape = {"spec": file.name, "provider": checked.spec.provider, **shape}
    return shape


def _settings_or_defaults(obj: Context) -> Settings:
    """The config when there is one; `validate` also works without one (the local backend's rules)."""
    try:
        return obj.loader()()
    except NoConfigFound:
        return default_settings()
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@config_options
@pass_ctx
def validate(obj: Context, file: Path, as_json: bool) -> None:
    """Check FILE (requests, or a spec NAME.json with its data) by the inbox's rules: 0 valid, 1 invalid."""
    settings = _settings_or_defaults(obj)
    checked = _check_or_exit(file, settings, as_json=as_json)
    if as_json:
        return
    report = checked.report
    requests = f"{counted(report.request_count, 'request')} for {report.endpoint}"
    if checked.spec is None:
        click.echo(f"{file}: valid, {requests}")
    else:
        spec = checked.spec
        click.echo(f"{file}: valid spec for provider {spec.provider!r}; its input {spec.input}: {requests}")


def _copy_in(source: Path, inbox: Path, relative: PurePosixPath, taken: str) -> Path:
    """Copy `source` to `inbox/relative` under an ignored name, then rename: the daemon only
    ever sees a complete file. Refuses (1, saying `taken`) to replace what is there."""
    target = inbox.joinpath(*relative.parts)
    try:
        # Members of group batchd may plant a symlink in the inbox (a `data` link to /etc), and
        # submit may run as root: the folders are reached without following one.
        folder = open_folder(inbox, relative.parts[:-1], make=0o755)
    except NotRegularFile as exc:
        fail(f"{target}: {exc}", 1)
    try:
        if os.path.lexists(target):
            fail(f"{target} is already waiting in the inbox; {taken}", 1)
        tmp = f".{relative.name}.{uuid.uuid4().hex[:8]}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(source, "rb") as src, os.fdopen(os.open(tmp, flags, 0o644, dir_fd=folder), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(tmp, relative.name, src_dir_fd=folder, dst_dir_fd=folder)
    finally:
        os.close(folder)
    return target


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", help="Name of the submission (default: the file's name without its extension).")
@config_options
@pass_ctx
def submit(obj: Context, file: Path, name: str | None) -> None:
    """Validate FILE (requests, or a spec with its data), then drop it atomically into the inbox."""
    settings = obj.load()
    checked = _check_or_exit(file, settings, err=True)
    name = name or file.stem
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        fail(f"--name {name!r}: a plain file name is needed", 2)
    inbox = settings.inbox_dir
    inbox.mkdir(parents=True, exist_ok=True)
    own = PurePosixPath(f"{name}{'.json' if checked.spec else '.jsonl'}")
    if os.path.lexists(inbox / own):
        fail(f"{inbox / own} is already waiting in the inbox; choose another --name", 1)
    if checked.spec is not None and checked.data is not None:
        # Data first: a spec in the inbox whose data is not there yet would be rejected.
        _copy_in(checked.data, inbox, PurePosixPath(checked.spec.input), "give the spec another input path")
    target = _copy_in(file, inbox, own, "choose another --name")
    click.echo(f"submitted {file} as {target} ({counted(checked.report.request_count, 'request')})")
    from batchd.service import lock_holder  # the daemon's modules, only for the one command that asks

    if lock_holder(settings.state_dir) is None:
        click.echo(
            f"note: no batchd daemon runs on {settings.state_dir} here; the file waits in the inbox "
            "until one does (`batchd run`)"
        )
