"""Settings: a TOML file, `BATCHD_*` environment overrides and command-line flags (DESIGN §6).

Precedence is flags > environment > file > defaults. Every problem names the key
it is about and is raised as ConfigError, which the CLI turns into exit code 2.

`settings.py` holds what batchd is configured with (frozen dataclasses, Secret, ConfigError),
`load.py` finds and reads the file and the overrides, `build.py` turns raw values into Settings.
"""

from batchd.config.build import build_settings, decode_secret
from batchd.config.load import DEFAULT_CONFIG_PATH, default_settings, find_config_path, load_settings, parse_override
from batchd.config.settings import (
    DEFAULT_BASE_URLS,
    DEFAULT_KEY_ENVS,
    DEFAULT_PROVIDER,
    EVENT_TYPES,
    BudgetSettings,
    ClusterSettings,
    ConfigError,
    DeliverySettings,
    InboxSettings,
    LocalSettings,
    MetricsSettings,
    NoConfigFound,
    PollingSettings,
    Price,
    ProviderSettings,
    ResubmitSettings,
    Secret,
    Settings,
    SubmitSettings,
    WebhookEndpoint,
)

__all__ = [
    "DEFAULT_BASE_URLS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_KEY_ENVS",
    "DEFAULT_PROVIDER",
    "EVENT_TYPES",
    "BudgetSettings",
    "ClusterSettings",
    "ConfigError",
    "DeliverySettings",
    "InboxSettings",
    "LocalSettings",
    "MetricsSettings",
    "NoConfigFound",
    "PollingSettings",
    "Price",
    "ProviderSettings",
    "ResubmitSettings",
    "Secret",
    "Settings",
    "SubmitSettings",
    "WebhookEndpoint",
    "build_settings",
    "decode_secret",
    "default_settings",
    "find_config_path",
    "load_settings",
    "parse_override",
]
