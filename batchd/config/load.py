"""Reading configuration: the file, `BATCHD_*` environment overrides and `--set` overrides (DESIGN §6).

Precedence is flags > environment > file > defaults. Every key is checked against the
known ones here, before `build.py` reads their values.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchd.config.build import build_settings
from batchd.config.settings import ConfigError, NoConfigFound, Settings

DEFAULT_CONFIG_PATH = Path("/etc/batchd/batchd.toml")

# The keys a file may hold, per section; anything else is refused by name.
_TOP_KEYS = {"state_dir", "inbox_dir", "outbox_dir", "database_url"}
_SECTION_KEYS: dict[str, set[str]] = {
    "provider": {
        "kind",
        "base_url",
        "api_key",
        "api_key_env",
        "api_key_file",
        "max_batch_requests",
        "max_batch_bytes",
        "max_request_bytes",
        "model",
        "max_batches_in_flight",
        "max_enqueued_tokens",
        "stuck_after_s",
        "delete_files",
        "webhook_secret",
        "webhook_secret_env",
        "webhook_secret_file",
    },
    "budget": {"usd_per_day", "usd_per_month"},
    "resubmit": {"max_rounds"},
    "cluster": {"lease_s"},
    "local": {"engine", "upstream_url", "concurrency", "max_body_bytes"},
    "inbox": {
        "settle_s",
        "rescan_s",
        "pack_max_requests",
        "allow_webhook_urls",
        "webhook_secret",
        "webhook_secret_env",
        "webhook_secret_file",
    },
    "submit": {"completion_window"},
    "polling": {"min_interval_s", "max_interval_s"},
    "delivery": {"timeout_s", "retry_delays_s"},
    "metrics": {"listen", "token_file"},
}
_WEBHOOK_KEYS = {"url", "secret", "secret_env", "secret_file", "events"}


def find_config_path(flag: str | Path | None, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read and whether the user named it explicitly."""
    if flag:
        return Path(flag), True
    if environ.get("BATCHD_CONFIG"):
        return Path(environ["BATCHD_CONFIG"]), True
    return DEFAULT_CONFIG_PATH, False


def load_settings(
    config: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the file, apply `BATCHD_*` overrides, then flag overrides (dotted keys)."""
    env = os.environ if environ is None else environ
    path, explicit = find_config_path(config, env)
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path.is_file():
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        base_dir = path.resolve().parent
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")
    else:
        # Built-in defaults would put the state under /var/lib/batchd: as root that silently
        # makes a second installation, as anyone else it dies on a PermissionError.
        raise NoConfigFound(
            f"no config found (no --config, no $BATCHD_CONFIG, no {path}); "
            "make one with `batchd init DIR`, then pass --config DIR/batchd.toml"
        )
    _check_known_keys(raw)
    _apply_env(raw, env)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return build_settings(raw, base_dir=base_dir, environ=env, config_path=path.resolve() if path.is_file() else None)


def default_settings() -> Settings:
    """The built-in defaults, for commands that can work without a config (`validate`)."""
    return build_settings({}, base_dir=Path.cwd(), environ={}, config_path=None)


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` from a `--set` flag; the value is a TOML literal or a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    return key.strip(), _literal(value.strip())


def _literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _check_known_keys(raw: Mapping[str, Any]) -> None:
    for key, value in raw.items():
        if key in _TOP_KEYS:
            continue
        if key in _SECTION_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            for sub in value:
                if sub not in _SECTION_KEYS[key]:
                    raise ConfigError(f"unknown key {key}.{sub}")
            continue
        if key == "pricing":
            _check_pricing(value)
            continue
        if key == "providers":
            _check_providers(value)
            continue
        if key == "webhooks":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError("webhooks must be an array of tables ([[webhooks]])")
            for i, entry in enumerate(value):
                for sub in entry:
                    if sub not in _WEBHOOK_KEYS:
                        raise ConfigError(f"unknown key webhooks[{i}].{sub}")
            continue
        raise ConfigError(f"unknown key {key}")


def _check_providers(value: Any) -> None:
    """[providers.NAME] tables, each with the keys of [provider]."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError("providers must hold tables: [providers.NAME]")
    for name, table in value.items():
        for sub in table:
            if sub not in _SECTION_KEYS["provider"]:
                raise ConfigError(f"unknown key providers.{name}.{sub}")


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith("BATCHD_"):
            continue
        rest = name[len("BATCHD_") :].lower()
        if rest in _TOP_KEYS:
            raw[rest] = _literal(value)
            continue
        for section, keys in _SECTION_KEYS.items():
            prefix = section + "_"
            if rest.startswith(prefix) and rest[len(prefix) :] in keys:
                raw.setdefault(section, {})[rest[len(prefix) :]] = _literal(value)
                break
        # Anything else (BATCHD_CONFIG, a secret named by *_env) is not an override.


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key:
        if section not in _TOP_KEYS:
            raise ConfigError(f"unknown key {dotted}")
        raw[section] = value
        return
    if section not in _SECTION_KEYS or key not in _SECTION_KEYS[section]:
        raise ConfigError(f"unknown key {dotted}")
    raw.setdefault(section, {})[key] = value


_PRICE_KEYS = {"input_per_mtok", "output_per_mtok"}


def _check_pricing(value: Any) -> None:
    if not isinstance(value, dict):
        raise ConfigError("[pricing] must be a table of model = {input_per_mtok = …, output_per_mtok = …}")
    for model, price in value.items():
        if not isinstance(price, dict):
            raise ConfigError(f"pricing.{model!r} must be a table {{input_per_mtok = …, output_per_mtok = …}}")
        for sub in price:
            if sub not in _PRICE_KEYS:
                raise ConfigError(f"unknown key pricing.{model!r}.{sub}")
