"""`batchd emulator` and `batchd demo`: batchd without a provider, for tests and a first look."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from batchd import logs
from batchd.cli.common import fail
from batchd.config.settings import is_loopback

if TYPE_CHECKING:
    from batchd.emulator.provider_hooks import HookTarget


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


def _hook_targets(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`openai=http://…` → ("openai", "http://…"), for each --provider-webhook."""
    parsed = []
    for value in values:
        dialect, sep, url = value.partition("=")
        if not sep or not url:
            raise click.BadParameter(f"{value!r} is not DIALECT=URL (e.g. openai=http://127.0.0.1:9464/hooks/default)")
        parsed.append((dialect.strip(), url.strip()))
    return tuple(parsed)


SECONDS = click.FloatRange(min=0.0)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, type=int, show_default=True, help="0: any free port (the log names it).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Default: ./batchd-emulator")
@click.option(
    "--api-key", envvar="BATCHD_EMULATOR_API_KEY", show_envvar=True,
    help="Accept only this bearer token, on every route (default: any non-empty one on the API routes). "
    "Required when --host is not a loopback address.",
)  # fmt: skip
@click.option(
    "--max-body-bytes", type=click.IntRange(min=1),
    help="Refuse request bodies larger than this with 413, before reading them "
    "(default: the largest batch input, Gemini's 2 GB file, plus 1 MiB for the form).",
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
@click.option(
    "--provider-webhook", "provider_webhooks", multiple=True, callback=_hook_targets, metavar="DIALECT=URL",
    help="Send this dialect's batch events (openai or gemini), signed, to URL when a batch ends, as the "
    "provider would (e.g. openai=http://127.0.0.1:9464/hooks/default). Repeatable, once per dialect.",
)  # fmt: skip
@click.option(
    "--provider-webhook-secret", envvar="BATCHD_EMULATOR_PROVIDER_WEBHOOK_SECRET", show_envvar=True,
    help="The Standard Webhooks secret (whsec_…) that signs the --provider-webhook events.",
)  # fmt: skip
def emulator(
    host: str,
    port: int,
    data_dir: Path | None,
    api_key: str | None,
    max_body_bytes: int | None,
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
    provider_webhooks: tuple[tuple[str, str], ...],
    provider_webhook_secret: str | None,
) -> None:
    """The embedded Batch API on its own: Together dialect at /v1/, OpenAI's at /openai/v1/, Anthropic's at
    /anthropic/, Gemini's at /gemini/."""
    from batchd.emulator.bodies import DEFAULT_MAX_BODY_BYTES
    from batchd.emulator.faults import RandomFaults
    from batchd.emulator.server import run_emulator
    from batchd.emulator.timeline import Timeline

    if not api_key and not is_loopback(host):
        # Without a key any token is accepted and the control routes are open: fine for this machine only.
        fail(f"--host {host} is not a loopback address: --api-key (or BATCHD_EMULATOR_API_KEY) is required", 2)
    targets = _targets(provider_webhooks, provider_webhook_secret)
    logs.configure()
    logs.redact_values(key for key in (api_key, upstream_api_key, provider_webhook_secret) if key)
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
        max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES,
        provider_webhooks=targets,
    )


def _targets(given: tuple[tuple[str, str], ...], secret: str | None) -> list[HookTarget]:
    """The --provider-webhook targets, each signed with --provider-webhook-secret (exit 2 when unusable)."""
    from batchd.emulator.provider_hooks import HookTarget

    if given and not secret:
        fail("--provider-webhook needs --provider-webhook-secret (or BATCHD_EMULATOR_PROVIDER_WEBHOOK_SECRET)", 2)
    if len({dialect for dialect, _ in given}) < len(given):
        fail("--provider-webhook: one URL per dialect", 2)
    try:
        return [HookTarget(dialect, url, secret or "") for dialect, url in given]
    except ValueError as exc:
        fail(f"--provider-webhook: {exc}", 2)


@click.command()
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), help="Use (and keep) this folder.")
def demo(keep: Path | None) -> None:
    """A complete tour on the local backend: no key, no network."""
    from batchd.demo import run_demo

    sys.exit(run_demo(keep))
