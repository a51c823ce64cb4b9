"""structlog set-up: JSON lines when stdout is not a terminal (journald), console when it is.

Secrets never reach a log line: values of keys that look like secrets are
replaced, Secret objects print as `***` anyway, and the configured secret
values themselves (`redact_values`) are blanked wherever they appear in a
rendered line, tracebacks included.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_SECRET_WORDS = ("api_key", "secret", "authorization", "password", "token")
#: Shorter values are not blanked: they would mangle ordinary words (and are no real secrets).
MIN_SECRET_LENGTH = 8

_secret_values: set[str] = set()
#: _secret_values, longest first (so a secret that contains another is blanked whole); sorted
#: when a value is added, not for every line
_by_length: tuple[str, ...] = ()


def redact_values(values: Iterable[str]) -> None:
    """Blank these values (API keys, webhook secrets) wherever they appear in a log line from now on."""
    global _by_length
    for value in values:
        for form in (value, value.removeprefix("whsec_")):
            if len(form) >= MIN_SECRET_LENGTH:
                _secret_values.add(form)
    _by_length = tuple(sorted(_secret_values, key=len, reverse=True))


def scrub(_logger: Any, _method: str, line: Any) -> Any:
    """After rendering: replace every registered secret value in the finished line."""
    if isinstance(line, str):
        for value in _by_length:
            if value in line:
                line = line.replace(value, "***")
    return line


@functools.lru_cache(maxsize=1024)
def _names_a_secret(key: str) -> bool:
    # Log lines use a few dozen key names, each looked at on every line.
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Blank the value of every key that names a secret."""
    for key in list(event_dict):
        if isinstance(key, str) and _names_a_secret(key):
            event_dict[key] = "***"
    return event_dict


def configure(*, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog for the process; `json=None` picks by whether stdout is a TTY."""
    use_json = (not sys.stdout.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
            scrub,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def for_library() -> None:
    """batchd used as a library (the Client): quiet, as the SDKs it mirrors are.

    Its log lines go to the standard library's `batchd.*` loggers, which hold a NullHandler:
    nothing is printed unless the application configures logging (`logging.basicConfig()`
    shows warnings; level DEBUG shows every retry). A process that configured structlog
    itself keeps its own configuration.
    """
    root = logging.getLogger("batchd")
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            redact,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["event"]),
            scrub,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
