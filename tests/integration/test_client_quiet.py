"""The Python Client is quiet, as the SDKs it mirrors are: its log lines go to the standard
library's `batchd` loggers and show only when the application configures logging."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

SCRIPT = """
import logging, sys
from batchd import Client
from batchd.providers.errors import ProviderError
if sys.argv[2] == "configured":
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(message)s")
client = Client(api_key="tok-secret-value-123", base_url=sys.argv[1], max_retries=1)
try:
    client.batches.get_batch("batch-1")
except ProviderError:
    pass
client.close()
"""


def refused_url() -> str:
    """A loopback port nobody listens on: every call fails and is retried, which is logged."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), refused_url(), mode],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def test_the_client_prints_nothing_unless_logging_is_configured() -> None:
    quiet = run("quiet")
    assert (quiet.stdout, quiet.stderr) == ("", "")
    configured = run("configured")
    assert configured.stdout == ""
    ours = [line for line in configured.stderr.splitlines() if line.startswith("batchd.")]
    assert any("provider.retry" in line for line in ours)  # through the stdlib loggers named batchd.*
    assert "tok-secret-value-123" not in configured.stderr
