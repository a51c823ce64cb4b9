"""Building Settings from checked raw values: typed readers, secrets, and one builder per section.

Every problem names the key it is about and is raised as ConfigError, which the CLI
turns into exit code 2.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchd.config.settings import (
    DEFAULT_BASE_URLS,
    DEFAULT_KEY_ENVS,
    DEFAULT_PROVIDER,
    DELETE_FILES,
    EVENT_TYPES,
    PROVIDER_KINDS,
    PROVIDER_NAME,
    WEBHOOK_KINDS,
    BudgetSettings,
    ClusterSettings,
    ConfigError,
    DeliverySettings,
    InboxSettings,
    LocalSettings,
    MetricsSettings,
    PollingSettings,
    Price,
    ProviderSettings,
    ResubmitSettings,
    Secret,
    Settings,
    SubmitSettings,
    WebhookEndpoint,
    is_loopback,
    listen_address,
)
from batchd.models import PROVIDER_LIMITS
from batchd.urls import normalise_url, redact_url, unsafe_char


def _str(table: Mapping[str, Any], key: str, name: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, not {value!r}")
    return value


def _num(table: Mapping[str, Any], key: str, name: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
    if value < 0:
        raise ConfigError(f"{name} must not be negative, not {value!r}")
    return float(value)


def _int(table: Mapping[str, Any], key: str, name: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer of at least {minimum}, not {value!r}")
    return value


def _choice(table: Mapping[str, Any], key: str, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(table, key, name, default)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _http_url(value: Any, name: str) -> str:
    """An http(s) URL; its credentials (user info, query values) never shown in a message."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a URL string, not {type(value).__name__}")
    shown = redact_url(value)
    char = unsafe_char(value)
    if char is not None:
        # httpx refuses every request to it, and urllib would quietly drop a tab or a newline.
        raise ConfigError(f"{name} must not hold control characters or whitespace ({char!r} in {shown!r})")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL: {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s) URL, not {shown!r}")
    return value


def _allowed_url(value: Any, name: str) -> str:
    """An allow-list entry: an http(s) URL that has a normal form to compare spec URLs with."""
    url = _http_url(value, name)
    try:
        normalise_url(url)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}: {redact_url(url)!r}") from None
    return url


def _path(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def _secrets(
    table: Mapping[str, Any],
    prefix: str,
    name: str,
    *,
    base_dir: Path,
    environ: Mapping[str, str],
) -> tuple[str, ...]:
    """A secret given as a value (or list), as `*_env` or as `*_file`; empty when none is set."""
    given = [k for k in (prefix, f"{prefix}_env", f"{prefix}_file") if table.get(k) not in (None, "")]
    if len(given) > 1:
        raise ConfigError(f"{name}: set only one of {', '.join(f'{name}.{k}' for k in given)}")
    if not given:
        return ()
    key = given[0]
    value = table[key]
    if key == prefix:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{name}.{key} must be a non-empty string or a list of them")
        return tuple(values)
    if not isinstance(value, str):
        raise ConfigError(f"{name}.{key} must be a string")
    if key.endswith("_env"):
        if not environ.get(value):
            raise ConfigError(f"{name}.{key}: environment variable {value} is not set")
        return tuple(environ[value].split())
    path = _path(value, base_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}.{key}: cannot read {path}: {exc.strerror}") from exc
    secrets = tuple(text.split())
    if not secrets:
        raise ConfigError(f"{name}.{key}: {path} is empty")
    return secrets


def _webhook_secrets(values: tuple[str, ...], name: str) -> tuple[Secret, ...]:
    for value in values:
        if not value.startswith("whsec_"):
            raise ConfigError(f"{name}: a webhook secret must look like whsec_<base64>")
        try:
            key = decode_secret(value)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{name}: the part after whsec_ is not valid base64") from exc
        if len(key) < 16:
            raise ConfigError(f"{name}: a webhook secret needs at least 16 random bytes (24–64 advised)")
    return tuple(Secret(v) for v in values)


def decode_secret(value: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret (padding optional, as the reference library allows)."""
    encoded = value.removeprefix("whsec_")
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)


def _build_cluster(table: Mapping[str, Any]) -> ClusterSettings:
    lease_s = _num(table, "lease_s", "cluster.lease_s", 30.0)
    if lease_s <= 0:
        raise ConfigError("cluster.lease_s must be above 0")
    return ClusterSettings(lease_s=lease_s)


def _build_pricing(table: Mapping[str, Any]) -> dict[str, Price]:
    prices = {}
    for model, price in table.items():
        name = f"pricing.{model!r}"
        prices[model] = Price(
            input_per_mtok=_num(price, "input_per_mtok", f"{name}.input_per_mtok", 0.0),
            output_per_mtok=_num(price, "output_per_mtok", f"{name}.output_per_mtok", 0.0),
        )
    return prices


def _build_budget(table: Mapping[str, Any], pricing: Mapping[str, Price]) -> BudgetSettings:
    budget = BudgetSettings(
        usd_per_day=_usd(table, "usd_per_day", "budget.usd_per_day"),
        usd_per_month=_usd(table, "usd_per_month", "budget.usd_per_month"),
    )
    if (budget.usd_per_day or budget.usd_per_month) and not pricing:
        raise ConfigError("[budget] needs [pricing]: without prices, no job's cost can be estimated")
    return budget


def _usd(table: Mapping[str, Any], key: str, name: str) -> float:
    value = table.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{name} must be a non-negative number of US dollars, not {value!r}")
    return float(value)


def _build_provider(
    p: Mapping[str, Any], where: str, *, base_dir: Path, environ: Mapping[str, str]
) -> ProviderSettings:
    """A [provider] or [providers.NAME] table (`where` names it in messages)."""
    kind = _choice(p, "kind", f"{where}.kind", "local", PROVIDER_KINDS)
    base_url = _str(p, "base_url", f"{where}.base_url", "")
    if base_url:
        _http_url(base_url, f"{where}.base_url")
    elif kind != "local":
        base_url = DEFAULT_BASE_URLS[kind]
    keys = _secrets(p, "api_key", where, base_dir=base_dir, environ=environ)
    api_key: Secret | None = Secret(keys[0]) if keys else None
    if api_key is None and kind != "local":
        env_name = DEFAULT_KEY_ENVS[kind]
        if not environ.get(env_name):
            raise ConfigError(
                f"{where}.api_key_env: no API key for {kind}: set {env_name}, "
                f"{where}.api_key_env or {where}.api_key_file"
            )
        api_key = Secret(environ[env_name])
    model = _str(p, "model", f"{where}.model", "")
    if model and kind != "gemini":
        raise ConfigError(
            f"{where}.model: only a gemini provider takes a model (the other kinds name it on each "
            "request line, and a spec's model rewrites those)"
        )
    hook_secrets = _secrets(p, "webhook_secret", where, base_dir=base_dir, environ=environ)
    if hook_secrets and kind not in WEBHOOK_KINDS:
        raise ConfigError(
            f"{where}.webhook_secret: a {kind} provider sends no batch webhooks (only {', '.join(WEBHOOK_KINDS)} do)"
        )
    return ProviderSettings(
        kind=kind,
        base_url=base_url,
        api_key=api_key,
        max_batch_requests=_int(p, "max_batch_requests", f"{where}.max_batch_requests", 0, 0),
        max_batch_bytes=_int(p, "max_batch_bytes", f"{where}.max_batch_bytes", 0, 0),
        max_request_bytes=_int(p, "max_request_bytes", f"{where}.max_request_bytes", 0, 0),
        model=model,
        max_batches_in_flight=_int(p, "max_batches_in_flight", f"{where}.max_batches_in_flight", 0, 0),
        max_enqueued_tokens=_int(p, "max_enqueued_tokens", f"{where}.max_enqueued_tokens", 0, 0),
        stuck_after_s=_num(p, "stuck_after_s", f"{where}.stuck_after_s", 0.0),
        delete_files=_choice(p, "delete_files", f"{where}.delete_files", "inputs", DELETE_FILES),
        webhook_secrets=_webhook_secrets(hook_secrets, f"{where}.webhook_secret"),
    )


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def build_settings(
    raw: Mapping[str, Any], *, base_dir: Path, environ: Mapping[str, str], config_path: Path | None
) -> Settings:
    """Settings from raw values whose keys `load.py` has checked; relative paths resolve against base_dir."""
    state_dir = _path(_str(raw, "state_dir", "state_dir", "/var/lib/batchd"), base_dir)
    inbox_text = _str(raw, "inbox_dir", "inbox_dir", "")
    outbox_text = _str(raw, "outbox_dir", "outbox_dir", "")
    database_url = _database_url(_str(raw, "database_url", "database_url", ""), state_dir)

    p = _table(raw, "provider")
    provider = _build_provider(p, "provider", base_dir=base_dir, environ=environ)
    providers = {DEFAULT_PROVIDER: provider}
    for name, table in _table(raw, "providers").items():
        if not PROVIDER_NAME.fullmatch(name) or name == DEFAULT_PROVIDER:
            raise ConfigError(
                f"[providers.{name}]: a provider's name is 1 to 32 of A-Z a-z 0-9 _ - "
                f"(and not {DEFAULT_PROVIDER!r}, the name of [provider])"
            )
        providers[name] = _build_provider(table, f"providers.{name}", base_dir=base_dir, environ=environ)

    lo = _table(raw, "local")
    engine = _choice(lo, "engine", "local.engine", "echo", ("echo", "upstream"))
    upstream_url = _str(lo, "upstream_url", "local.upstream_url", "")
    if engine == "upstream":
        if not upstream_url:
            raise ConfigError("local.upstream_url is required when local.engine = 'upstream'")
        _http_url(upstream_url, "local.upstream_url")
    max_body_bytes = _int(lo, "max_body_bytes", "local.max_body_bytes", LocalSettings.max_body_bytes, 1)
    for name, each in providers.items():
        # The daemon's own uploads to the local backend must fit under its cap.
        local_max = PROVIDER_LIMITS["local"].max_bytes
        largest_upload = min(each.max_batch_bytes or local_max, local_max)
        if each.kind == "local" and max_body_bytes < largest_upload:
            where = "provider" if name == DEFAULT_PROVIDER else f"providers.{name}"
            raise ConfigError(
                f"local.max_body_bytes must be at least {largest_upload}, the largest batch input batchd uploads to "
                f"the local backend (lower {where}.max_batch_bytes first)"
            )

    ib = _table(raw, "inbox")
    allow = ib.get("allow_webhook_urls", [])
    if not isinstance(allow, list):
        raise ConfigError("inbox.allow_webhook_urls must be a list of URLs")
    inbox_secrets = _secrets(ib, "webhook_secret", "inbox", base_dir=base_dir, environ=environ)
    inbox_webhook_secrets = _webhook_secrets(inbox_secrets, "inbox.webhook_secret")
    if allow and not inbox_webhook_secrets:
        raise ConfigError(
            "inbox.webhook_secret_env: allow_webhook_urls is set, so a secret to sign those events is needed"
        )

    sb = _table(raw, "submit")
    window = _str(sb, "completion_window", "submit.completion_window", "24h")
    if not re.fullmatch(r"[0-9]+[hd]", window):
        raise ConfigError(f"submit.completion_window must look like '24h', not {window!r}")

    po = _table(raw, "polling")
    min_interval = _num(po, "min_interval_s", "polling.min_interval_s", 5.0)
    max_interval = _num(po, "max_interval_s", "polling.max_interval_s", 60.0)
    if max_interval < min_interval:
        raise ConfigError("polling.max_interval_s must not be below polling.min_interval_s")

    de = _table(raw, "delivery")
    delays = de.get("retry_delays_s", list(DeliverySettings.retry_delays_s))
    if not isinstance(delays, list) or not all(
        isinstance(d, int | float) and not isinstance(d, bool) and d >= 0 for d in delays
    ):
        raise ConfigError("delivery.retry_delays_s must be a list of non-negative numbers of seconds")

    pricing = _build_pricing(_table(raw, "pricing"))
    budget = _build_budget(_table(raw, "budget"), pricing)
    metrics = _build_metrics(_table(raw, "metrics"), base_dir=base_dir, environ=environ)
    for name, each in providers.items():
        if each.webhook_secrets and not metrics.listen:
            where = "provider" if name == DEFAULT_PROVIDER else f"providers.{name}"
            raise ConfigError(
                f"{where}.webhook_secret: the provider's webhooks are received at /hooks/{name} on the "
                "[metrics] listen address, so metrics.listen must be set"
            )

    return Settings(
        state_dir=state_dir,
        inbox_dir=_path(inbox_text, base_dir) if inbox_text else state_dir / "inbox",
        outbox_dir=_path(outbox_text, base_dir) if outbox_text else state_dir / "outbox",
        database_url=database_url,
        provider=provider,
        providers=providers,
        local=LocalSettings(
            engine=engine,
            upstream_url=upstream_url,
            concurrency=_int(lo, "concurrency", "local.concurrency", 16, 1),
            max_body_bytes=max_body_bytes,
        ),
        inbox=InboxSettings(
            settle_s=_num(ib, "settle_s", "inbox.settle_s", 1.0),
            rescan_s=_num(ib, "rescan_s", "inbox.rescan_s", 30.0),
            allow_webhook_urls=tuple(_allowed_url(u, f"inbox.allow_webhook_urls[{i}]") for i, u in enumerate(allow)),
            webhook_secrets=inbox_webhook_secrets,
            pack_max_requests=_int(ib, "pack_max_requests", "inbox.pack_max_requests", 0, 0),
        ),
        submit=SubmitSettings(completion_window=window),
        polling=PollingSettings(min_interval_s=min_interval, max_interval_s=max_interval),
        delivery=DeliverySettings(
            timeout_s=_num(de, "timeout_s", "delivery.timeout_s", 15.0),
            retry_delays_s=tuple(float(d) for d in delays),
        ),
        webhooks=_build_webhooks(raw.get("webhooks", []), base_dir=base_dir, environ=environ),
        metrics=metrics,
        resubmit=ResubmitSettings(max_rounds=_int(_table(raw, "resubmit"), "max_rounds", "resubmit.max_rounds", 2, 0)),
        pricing=pricing,
        budget=budget,
        cluster=_build_cluster(_table(raw, "cluster")),
        config_path=config_path,
    )


def _build_webhooks(
    entries: list[Mapping[str, Any]], *, base_dir: Path, environ: Mapping[str, str]
) -> tuple[WebhookEndpoint, ...]:
    endpoints = []
    for i, entry in enumerate(entries):
        name = f"webhooks[{i}]"
        url = _http_url(entry.get("url"), f"{name}.url")
        secrets = _secrets(entry, "secret", name, base_dir=base_dir, environ=environ)
        if not secrets:
            raise ConfigError(f"{name}.secret_env: every webhook endpoint needs a secret")
        events = entry.get("events", list(EVENT_TYPES))
        if not isinstance(events, list) or not events:
            raise ConfigError(f"{name}.events must be a non-empty list")
        for event in events:
            if event not in EVENT_TYPES:
                raise ConfigError(f"{name}.events: unknown event type {event!r}")
        endpoints.append(
            WebhookEndpoint(url=url, secrets=_webhook_secrets(secrets, f"{name}.secret"), events=tuple(events))
        )
    return tuple(endpoints)


def _build_metrics(table: Mapping[str, Any], *, base_dir: Path, environ: Mapping[str, str]) -> MetricsSettings:
    listen = _str(table, "listen", "metrics.listen", "")
    tokens = _secrets(table, "token", "metrics", base_dir=base_dir, environ=environ)
    if listen:
        host, _ = listen_address(listen, "metrics.listen")
        if not tokens and not is_loopback(host):
            raise ConfigError(
                f"metrics.token_file: required when metrics.listen is not a loopback address ({listen!r}): "
                "the status page and /metrics would be open to the network"
            )
    return MetricsSettings(listen=listen, tokens=tuple(Secret(t) for t in tokens))


def _database_url(value: str, state_dir: Path) -> str:
    if not value:
        return f"sqlite:///{state_dir / 'batchd.db'}"
    scheme = value.split(":", 1)[0]
    if scheme in ("postgresql", "postgres"):
        # A plain postgresql:// URL uses the driver of the `postgres` extra.
        return "postgresql+psycopg:" + value.split(":", 1)[1]
    if not (scheme.startswith("sqlite") or scheme.startswith("postgresql+")):
        raise ConfigError(f"database_url must be sqlite:/// or postgresql://, not {scheme}://")
    return value
