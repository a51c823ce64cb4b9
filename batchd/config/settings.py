"""What batchd is configured with: the frozen Settings, Secret, ConfigError and the constants they use.

No file, no environment: `load.py` finds and reads those, `build.py` turns them into these.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from batchd.models import PROVIDER_LIMITS, REQUEST_BODY_SLACK, Limits

EVENT_TYPES: tuple[str, ...] = (
    "batch.completed",
    "batch.failed",
    "batch.expired",
    "batch.cancelled",
    "batch.rejected",
)

DEFAULT_BASE_URLS = {
    "together": "https://api.together.ai",
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}

#: The name of the [provider] table's provider (a job's provider_name when no spec names one).
DEFAULT_PROVIDER = "default"
#: What a [providers.NAME] table may be called.
PROVIDER_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
#: The kinds of provider batchd speaks.
PROVIDER_KINDS = ("local", "together", "openai", "anthropic", "gemini")
#: the kinds that announce their batch events with signed webhooks (a provider's webhook_secret)
WEBHOOK_KINDS = ("openai", "gemini")
#: what `delete_files` may say: which files batchd uploaded it deletes at the provider
DELETE_FILES = ("none", "inputs", "all")

DEFAULT_KEY_ENVS = {
    "together": "TOGETHER_API_KEY",
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
}


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


class NoConfigFound(ConfigError):
    """No config file was named and none is at the default path: batchd does not guess one."""


class Secret:
    """A secret string that never shows itself in a repr, a log line or an f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ProviderSettings:
    kind: str = "local"
    #: empty: the kind's default (the local backend picks a loopback port at start)
    base_url: str = ""
    api_key: Secret | None = None
    #: per-batch limits; 0: the provider's own (PROVIDER_LIMITS)
    max_batch_requests: int = 0
    max_batch_bytes: int = 0
    #: the longest request line; 0: models.MAX_REQUEST_BYTES
    max_request_bytes: int = 0
    #: Gemini: the model a job's batch is created for when its spec names none (Gemini names
    #: the model in the create call, not on each line); empty: every spec must name one
    model: str = ""
    #: admission (#18): batches of this provider in flight at once; 0: no limit
    max_batches_in_flight: int = 0
    #: admission: tokens enqueued at once (estimated); 0: the provider's documented limit, else none
    max_enqueued_tokens: int = 0
    #: a batch not running (or running without progress) this long is cancelled and its requests
    #: go to a follow-up round; 0: the dialect's default
    stuck_after_s: float = 0.0
    #: which files batchd uploaded are deleted at the provider: "none" | "inputs" | "all"
    delete_files: str = "inputs"
    #: the provider's own signing secrets for its batch events, received at /hooks/NAME (several
    #: during rotation); empty: its events are not taken
    webhook_secrets: tuple[Secret, ...] = ()

    @property
    def limits(self) -> Limits:
        """What one remote batch may hold: the provider's table, narrowed or widened by config."""
        base = PROVIDER_LIMITS[self.kind]
        return Limits(
            max_bytes=self.max_batch_bytes or base.max_bytes,
            max_requests=self.max_batch_requests or base.max_requests,
            max_request_bytes=self.max_request_bytes or base.max_request_bytes,
        )

    @property
    def validation_limits(self) -> Limits:
        """What a dropped file is checked against: the provider's own batch limits and config's
        per-request limit. Config's batch limits only decide where a file is cut into shards."""
        return replace(PROVIDER_LIMITS[self.kind], max_request_bytes=self.limits.max_request_bytes)


@dataclass(frozen=True)
class ClusterSettings:
    #: how long a daemon's hold on a job lasts without a heartbeat (renewed every third of it):
    #: with several daemons on one PostgreSQL database, a dead daemon's jobs move on after this
    lease_s: float = 30.0


@dataclass(frozen=True)
class ResubmitSettings:
    #: automatic follow-up rounds for requests that failed for a passing reason (0: none)
    max_rounds: int = 2


@dataclass(frozen=True)
class Price:
    """USD per million tokens, for a job's estimated cost."""

    input_per_mtok: float
    output_per_mtok: float


@dataclass(frozen=True)
class LocalSettings:
    engine: str = "echo"
    upstream_url: str = ""
    concurrency: int = 16
    #: request bodies the local backend takes (413 beyond): the largest batch input it accepts and a form around it
    max_body_bytes: int = PROVIDER_LIMITS["local"].max_bytes + REQUEST_BODY_SLACK


@dataclass(frozen=True)
class InboxSettings:
    settle_s: float = 1.0
    #: full rescans of the inbox (events are hints; the rescan is the truth)
    rescan_s: float = 30.0
    allow_webhook_urls: tuple[str, ...] = ()
    #: signs events for a spec's webhook_url; several during rotation
    webhook_secrets: tuple[Secret, ...] = ()
    #: files of at most this many requests, taken in one go, share remote batches (packs.py); 0: never
    pack_max_requests: int = 0


@dataclass(frozen=True)
class SubmitSettings:
    completion_window: str = "24h"


@dataclass(frozen=True)
class PollingSettings:
    min_interval_s: float = 5.0
    max_interval_s: float = 60.0


@dataclass(frozen=True)
class DeliverySettings:
    timeout_s: float = 15.0
    retry_delays_s: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)


@dataclass(frozen=True)
class BudgetSettings:
    """A spend budget (with [pricing]): new jobs wait in "queued" past it; 0: none."""

    usd_per_day: float = 0.0
    usd_per_month: float = 0.0


@dataclass(frozen=True)
class MetricsSettings:
    #: "host:port" of the /metrics, /healthz and status page listener; empty: no listener (port 0: any free port)
    listen: str = ""
    #: what every route of the listener asks for (from token_file; several during rotation); empty: none
    tokens: tuple[Secret, ...] = ()

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when the listener is off."""
        return listen_address(self.listen, "metrics.listen") if self.listen else None


@dataclass(frozen=True)
class WebhookEndpoint:
    url: str
    secrets: tuple[Secret, ...]
    events: tuple[str, ...] = EVENT_TYPES


@dataclass(frozen=True)
class Settings:
    """Everything batchd is configured with. Paths are absolute."""

    state_dir: Path
    inbox_dir: Path
    outbox_dir: Path
    database_url: str
    #: the default provider ([provider]), also providers[DEFAULT_PROVIDER]
    provider: ProviderSettings = field(default_factory=ProviderSettings)
    #: every configured provider by name: "default" ([provider]) and each [providers.NAME]
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    local: LocalSettings = field(default_factory=LocalSettings)
    inbox: InboxSettings = field(default_factory=InboxSettings)
    submit: SubmitSettings = field(default_factory=SubmitSettings)
    polling: PollingSettings = field(default_factory=PollingSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    webhooks: tuple[WebhookEndpoint, ...] = ()
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    resubmit: ResubmitSettings = field(default_factory=ResubmitSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    #: model name → price; a job whose model is listed gets an estimated cost
    pricing: Mapping[str, Price] = field(default_factory=dict)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    #: the file these settings came from, if any
    config_path: Path | None = None

    def provider_named(self, name: str) -> ProviderSettings | None:
        """The provider a job or a spec names ("default": [provider]); None when none is configured so."""
        if name == DEFAULT_PROVIDER:
            return self.provider
        return self.providers.get(name)

    @property
    def provider_names(self) -> tuple[str, ...]:
        """Every configured provider's name, "default" first."""
        return (DEFAULT_PROVIDER, *sorted(n for n in self.providers if n != DEFAULT_PROVIDER))

    @property
    def local_dir(self) -> Path:
        """Where the embedded backend keeps its files and batches."""
        return self.state_dir / "local"


def is_loopback(host: str) -> bool:
    """Whether `host` binds to this machine only: localhost, 127.0.0.0/8 or ::1 (also as [::1]
    or as an IPv4-mapped address)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name other than localhost may resolve to anything
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def listen_address(value: str, name: str) -> tuple[str, int]:
    """`127.0.0.1:9464`, `[::1]:9464` or `localhost:9464` → (host, port); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535 or any(c in host for c in "[]/ "):
        raise ConfigError(f"{name} must be HOST:PORT (e.g. 127.0.0.1:9464 or [::1]:9464), not {value!r}")
    return host, int(port)
