"""`batchd init DIR`: a working config, its folders and a webhook secret, without writing TOML by hand.

What it writes is meant to be read: every key it sets carries a comment, and the
keys it leaves at their defaults are named where a user would look for them. It
never replaces anything: an existing config is refused (exit 1), and a secret file
already there is kept (a receiver may be verifying with it).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from pathlib import Path

import click

from batchd.cli.common import fail
from batchd.config.settings import DEFAULT_BASE_URLS, DEFAULT_KEY_ENVS, PROVIDER_KINDS
from batchd.webhooks import new_secret

CONFIG_NAME = "batchd.toml"
SECRET_NAME = "webhook-secret"
EXAMPLE_NAME = "example.jsonl"
#: A sample model per dialect, for the example file (the local backend answers any model).
EXAMPLE_MODELS = {
    "local": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "together": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5",
    "gemini": "gemini-2.5-flash",
}
EVENTS = '["batch.completed", "batch.failed", "batch.expired", "batch.cancelled", "batch.rejected"]'


def _provider_section(kind: str) -> str:
    if kind == "local":
        return (
            "[provider]\n"
            'kind = "local"                     # the embedded backend: offline, no key; it answers each request\n'
            '                                   # with an echo of it (engine "upstream" in [local] forwards to a\n'
            "                                   # real OpenAI-compatible server instead)\n"
            '# For a real provider: kind = "together" | "openai" | "anthropic" | "gemini", and its key, e.g.\n'
            '# kind = "together"\n'
            '# api_key_env = "TOGETHER_API_KEY"  # or api_key_file = "/path/to/key"\n'
            "\n"
            "[polling]\n"
            "min_interval_s = 1.0               # the local backend is on this machine: poll it often\n"
        )
    model = (
        f'model = "{EXAMPLE_MODELS[kind]}"        # Gemini names the model per batch: this one, or a spec\'s "model"\n'
        if kind == "gemini"
        else ""
    )
    return (
        "[provider]\n"
        f'kind = "{kind}"\n'
        f'api_key_env = "{DEFAULT_KEY_ENVS[kind]}"     # the variable holding the key; or api_key_file = "/path"\n'
        f"{model}"
        f'# base_url = "{DEFAULT_BASE_URLS[kind]}"\n'
    )


def config_text(kind: str) -> str:
    """The config `batchd init --provider KIND` writes (paths relative to its own folder)."""
    return (
        f"# batchd configuration, written by `batchd init`. Every key: docs/reference/config.md.\n"
        "# Relative paths are relative to this file's folder.\n"
        "\n"
        'state_dir  = "state"               # the database (and the local backend\'s files)\n'
        'inbox_dir  = "inbox"               # drop NAME.jsonl (requests) or NAME.json (a spec) here\n'
        'outbox_dir = "outbox"              # results: outbox/NAME/output.jsonl, errors.jsonl, job.json\n'
        "\n"
        f"{_provider_section(kind)}"
        "\n"
        "[inbox]\n"
        f'webhook_secret_file = "{SECRET_NAME}"   # signs the events sent to a spec\'s webhook_url\n'
        "\n"
        "[metrics]\n"
        'listen = "127.0.0.1:9464"          # the status page at http://127.0.0.1:9464/, /metrics, /healthz\n'
        "\n"
        "# Signed webhooks (Standard Webhooks) when a job ends: uncomment, and set your receiver's URL.\n"
        f"# The receiver verifies each event with the secret in {SECRET_NAME} (docs/webhooks.md).\n"
        "# [[webhooks]]\n"
        '# url = "https://hooks.example.com/batchd"\n'
        f'# secret_file = "{SECRET_NAME}"\n'
        f"# events = {EVENTS}\n"
    )


def example_lines(kind: str) -> str:
    """Two requests in the dialect of `kind`, for the first drop."""
    model = EXAMPLE_MODELS[kind]
    lines = []
    for i, question in enumerate(("Say hello in French.", "Name a prime number."), 1):
        messages = [{"role": "user", "content": question}]
        if kind == "anthropic":
            line: dict[str, object] = {
                "custom_id": f"hello-{i}", "params": {"model": model, "max_tokens": 64, "messages": messages},
            }  # fmt: skip
        elif kind == "gemini":
            # No model on the line: the config's (or a spec's) names it for the whole batch.
            contents = [{"role": "user", "parts": [{"text": question}]}]
            request = {"contents": contents, "generationConfig": {"maxOutputTokens": 64}}
            line = {"key": f"hello-{i}", "request": request}
        else:
            body = {"model": model, "messages": messages, "max_tokens": 64}
            line = {"custom_id": f"hello-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        lines.append(json.dumps(line) + "\n")
    return "".join(lines)


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create `path` with `text`, never replacing a file: a crash leaves no half-written config
    under the real name (it is written aside, then linked, which fails if the name is taken)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink()


@click.command()
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--provider", "kind", default="local", show_default=True, type=click.Choice(PROVIDER_KINDS),
    help="Pre-fill this provider's section.",
)  # fmt: skip
def init(directory: Path, kind: str) -> None:
    """Write a working config in DIR/batchd.toml, its folders and a webhook secret."""
    config = directory / CONFIG_NAME
    if config.exists() or config.is_symlink():
        fail(f"{config} already exists; batchd init never replaces a config (choose another DIR)", 1)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for folder in ("state", "inbox", "outbox"):
            (directory / folder).mkdir(mode=0o750 if folder == "state" else 0o755, exist_ok=True)
        secret = directory / SECRET_NAME
        kept = secret.exists() or secret.is_symlink()
        if not kept:
            _write_new(secret, new_secret() + "\n", 0o600)
        example = directory / EXAMPLE_NAME
        if not (example.exists() or example.is_symlink()):
            _write_new(example, example_lines(kind), 0o644)
        _write_new(config, config_text(kind), 0o644)
    except FileExistsError:
        fail(f"{config} already exists; batchd init never replaces a config (choose another DIR)", 1)
    except OSError as exc:
        fail(f"cannot write in {directory}: {exc.strerror or exc}", 1)
    _print_next(directory, kind, kept)


def _print_next(directory: Path, kind: str, kept_secret: bool) -> None:
    shown = shlex.quote(str(directory))
    cmd = f"batchd --config {shlex.quote(str(directory / CONFIG_NAME))}"
    secret_note = "kept as it was" if kept_secret else "new, mode 0600"
    provider = "the local backend: offline, no key needed" if kind == "local" else f"{kind}"
    echo = click.echo
    echo(f"Wrote {directory / CONFIG_NAME} ({provider}),")
    echo(f"      {directory / SECRET_NAME} (the webhook secret, {secret_note}),")
    echo(f"      {directory / EXAMPLE_NAME} (two requests to try) and the folders state/, inbox/, outbox/.")
    echo("")
    if kind != "local":
        echo(f"First: export {DEFAULT_KEY_ENVS[kind]}=...   (or set api_key_file in the config)")
    echo("Next:")
    echo("  1. Run the daemon (in the foreground):")
    echo(f"       {cmd} run")
    echo("  2. In another terminal, drop the example into the inbox:")
    echo(f"       {cmd} submit {shlex.quote(str(directory / EXAMPLE_NAME))}")
    echo(f"  3. Once `{cmd} jobs` says completed, read the results:")
    echo(f"       cat {shown}/outbox/example/output.jsonl")
    echo("")
    echo("The status page: http://127.0.0.1:9464/ while the daemon runs.")
    if kind == "local":
        others = " | ".join(f'"{k}"' for k in PROVIDER_KINDS if k != "local")
        echo(f"A real provider: set [provider] kind = {others} and its api_key_env in the config")
        echo("(docs/providers.md), or start afresh with `batchd init --provider together DIR2`.")
