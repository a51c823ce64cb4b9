"""Configuration: file, environment and flag precedence; errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.config import ConfigError, Price, Secret, load_settings, parse_override
from batchd.models import PROVIDER_LIMITS, Limits

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batchd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_resolve_paths_against_the_config_folder(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, 'state_dir = "state"\n'), environ={})
    assert settings.state_dir == tmp_path / "state"
    assert settings.inbox_dir == tmp_path / "state" / "inbox"
    assert settings.outbox_dir == tmp_path / "state" / "outbox"
    assert settings.database_url == f"sqlite:///{tmp_path / 'state' / 'batchd.db'}"
    assert settings.provider.kind == "local"
    assert settings.polling.min_interval_s == 5.0
    assert settings.delivery.retry_delays_s[0] == 5


def test_the_local_backends_body_cap_fits_its_largest_batch_input_and_is_configurable(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""), environ={})
    largest = PROVIDER_LIMITS["local"].max_bytes
    assert largest < settings.local.max_body_bytes <= largest + 2 * 1024**2
    configured = load_settings(write(tmp_path, "[local]\nmax_body_bytes = 200000000\n"), environ={})
    assert configured.local.max_body_bytes == 200_000_000
    from_env = load_settings(write(tmp_path, ""), environ={"BATCHD_LOCAL_MAX_BODY_BYTES": "300000000"})
    assert from_env.local.max_body_bytes == 300_000_000


def test_the_local_backends_body_cap_must_take_the_daemons_own_uploads(tmp_path: Path) -> None:
    narrowed = "[provider]\nmax_batch_bytes = 5000\n"
    assert load_settings(write(tmp_path, narrowed + "[local]\nmax_body_bytes = 5000\n"), environ={})
    with pytest.raises(ConfigError, match=r"local.max_body_bytes must be at least 5000\b"):
        load_settings(write(tmp_path, narrowed + "[local]\nmax_body_bytes = 4999\n"), environ={})
    with pytest.raises(ConfigError, match=r"local.max_body_bytes must be at least 100000000\b"):
        load_settings(write(tmp_path, "[local]\nmax_body_bytes = 5000\n"), environ={})
    # Another provider does not use it.
    other = "[provider]\nkind = 'together'\n[local]\nmax_body_bytes = 5000\n"
    assert load_settings(write(tmp_path, other), environ={"TOGETHER_API_KEY": "k"}).local.max_body_bytes == 5000


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[polling]\nmin_interval_s = 3\nmax_interval_s = 90\n")
    env = {"BATCHD_POLLING_MIN_INTERVAL_S": "1", "BATCHD_POLLING_MAX_INTERVAL_S": "80"}
    settings = load_settings(path, environ=env, overrides={"polling.min_interval_s": 0.2})
    assert settings.polling.min_interval_s == 0.2
    assert settings.polling.max_interval_s == 80


def test_environment_values_are_toml_literals_or_bare_strings(tmp_path: Path) -> None:
    env = {
        "BATCHD_PROVIDER_KIND": "together",
        "TOGETHER_API_KEY": "k",
        "BATCHD_DELIVERY_RETRY_DELAYS_S": "[1, 2.5]",
        "BATCHD_STATE_DIR": '"elsewhere"',
    }
    settings = load_settings(write(tmp_path, ""), environ=env)
    assert settings.provider.kind == "together"
    assert settings.delivery.retry_delays_s == (1.0, 2.5)
    assert settings.state_dir == tmp_path / "elsewhere"


def test_other_batchd_variables_are_not_overrides(tmp_path: Path) -> None:
    env = {"BATCHD_WEBHOOK_SECRET": SECRET, "BATCHD_CONFIG": str(tmp_path / "batchd.toml")}
    settings = load_settings(write(tmp_path, ""), environ=env)
    assert settings.webhooks == ()


def test_config_found_through_batchd_config(tmp_path: Path) -> None:
    path = write(tmp_path, 'state_dir = "/srv/x"\n')
    assert load_settings(None, environ={"BATCHD_CONFIG": str(path)}).state_dir == Path("/srv/x")


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1\n", "unknown key colour"),
        ("[polling]\nfast = true\n", "unknown key polling.fast"),
        ("[polling]\nmin_interval_s = 'soon'\n", "polling.min_interval_s"),
        ("[polling]\nmin_interval_s = -1\n", "polling.min_interval_s"),
        ("[provider]\nkind = 'vertex'\n", "provider.kind"),
        ("[local]\nconcurrency = 0\n", "local.concurrency"),
        ("[local]\nmax_body_bytes = 0\n", "local.max_body_bytes"),
        ("[local]\nmax_body_bytes = '1 GB'\n", "local.max_body_bytes"),
        ("[local]\nengine = 'upstream'\n", "local.upstream_url"),
        ("[submit]\ncompletion_window = 'tomorrow'\n", "submit.completion_window"),
        ("[submit]\ncompletion_window = '²h'\n", "submit.completion_window"),
        (
            "[inbox]\nallow_webhook_urls = ['https://h:99999/']\nwebhook_secret = '" + SECRET + "'\n",
            "inbox.allow_webhook_urls[0]",
        ),
        ("[delivery]\nretry_delays_s = [1, -2]\n", "delivery.retry_delays_s"),
        ("[[webhooks]]\nurl = 'ftp://x'\nsecret = '" + SECRET + "'\n", "webhooks[0].url"),
        ("[[webhooks]]\nurl = 'https://x'\n", "webhooks[0].secret"),
        ("[[webhooks]]\nurl = 'https://x'\nsecret = 'plain'\n", "webhooks[0].secret"),
        ("[[webhooks]]\nurl = 'https://x'\nsecret = '" + SECRET + "'\nevents = ['batch.done']\n", "webhooks[0].events"),
        ("[[webhooks]]\nurl = 'https://x'\nsecrets = 'x'\n", "webhooks[0].secrets"),
        ("[inbox]\nallow_webhook_urls = ['https://h/']\n", "inbox.webhook_secret"),
        ("state_dir = 3\n", "state_dir"),
        ("database_url = 'mysql://x'\n", "database_url"),
        ("this is not toml", "not valid TOML"),
        ("[provider]\nmax_batches_in_flight = -1\n", "provider.max_batches_in_flight"),
        ("[provider]\nmax_enqueued_tokens = 1.5\n", "provider.max_enqueued_tokens"),
        ("[provider]\nstuck_after_s = -3\n", "provider.stuck_after_s"),
        ("[provider]\ndelete_files = 'some'\n", "provider.delete_files"),
        ("[provider]\nwebhook_secret = '" + SECRET + "'\n", "provider.webhook_secret"),
        (
            "[metrics]\nlisten = '127.0.0.1:0'\n"
            "[providers.x]\nkind = 'openai'\napi_key = 'k'\nwebhook_secret = 'plain'\n",
            "providers.x.webhook_secret",
        ),
        ("[providers.x]\nkind = 'openai'\napi_key = 'k'\nwebhook_secret = '" + SECRET + "'\n", "metrics.listen"),
        ("[budget]\nusd_per_day = 5\n", "[budget] needs [pricing]"),
        ("[budget]\nusd_per_month = -1\n", "budget.usd_per_month"),
        ("[budget]\nweekly = 1\n", "unknown key budget.weekly"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    assert key in str(info.value)


def test_together_needs_a_key_and_never_shows_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[provider]\nkind = 'together'\n")
    with pytest.raises(ConfigError, match="TOGETHER_API_KEY"):
        load_settings(path, environ={})
    settings = load_settings(path, environ={"TOGETHER_API_KEY": "tok-very-secret"})
    assert settings.provider.api_key == Secret("tok-very-secret")
    assert "tok-very-secret" not in repr(settings)
    assert settings.provider.base_url == "https://api.together.ai"


def test_api_key_from_file_and_env_name(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file\n", encoding="utf-8")
    path = write(tmp_path, "[provider]\nkind = 'together'\napi_key_file = 'key'\n")
    assert load_settings(path, environ={}).provider.api_key == Secret("from-file")
    path = write(tmp_path, "[provider]\nkind = 'together'\napi_key_env = 'MY_KEY'\n")
    assert load_settings(path, environ={"MY_KEY": "from-env"}).provider.api_key == Secret("from-env")
    with pytest.raises(ConfigError, match=r"provider\.api_key_env: environment variable MY_KEY"):
        load_settings(path, environ={})


def test_webhook_secrets_rotation_list_and_event_filter(tmp_path: Path) -> None:
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
    path = write(
        tmp_path,
        f"[[webhooks]]\nurl = 'https://h/x'\nsecret = ['{SECRET}', '{other}']\nevents = ['batch.failed']\n",
    )
    (endpoint,) = load_settings(path, environ={}).webhooks
    assert endpoint.secrets == (Secret(SECRET), Secret(other))
    assert endpoint.events == ("batch.failed",)


def test_unpadded_webhook_secret_is_accepted(tmp_path: Path) -> None:
    unpadded = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWg"  # 26 bytes, base64 without "=="
    path = write(tmp_path, f"[[webhooks]]\nurl = 'https://h/'\nsecret = '{unpadded}'\n")
    assert load_settings(path, environ={}).webhooks[0].secrets == (Secret(unpadded),)


def test_limits_resubmit_rounds_and_pricing(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[provider]\nmax_batch_requests = 1000\n[resubmit]\nmax_rounds = 0\n"
        '[pricing]\n"org/model-x" = { input_per_mtok = 0.5, output_per_mtok = 1.5 }\n',
    )
    settings = load_settings(path, environ={})
    assert (settings.provider.limits.max_requests, settings.provider.limits.max_bytes) == (1000, 100 * 1000**2)
    assert settings.resubmit.max_rounds == 0
    assert settings.pricing["org/model-x"] == Price(input_per_mtok=0.5, output_per_mtok=1.5)
    with pytest.raises(ConfigError, match="unknown key pricing"):
        load_settings(write(tmp_path, '[pricing]\n"m" = { per_token = 1 }\n'), environ={})
    with pytest.raises(ConfigError, match=r"resubmit\.max_rounds"):
        load_settings(write(tmp_path, "[resubmit]\nmax_rounds = -1\n"), environ={})


def test_admission_housekeeping_and_budget_keys(tmp_path: Path) -> None:
    text = (
        "[metrics]\nlisten = '127.0.0.1:0'\n"
        "[provider]\nmax_batches_in_flight = 3\nmax_enqueued_tokens = 90000\nstuck_after_s = 600\n"
        "delete_files = 'all'\n"
        "[providers.oa]\nkind = 'openai'\napi_key = 'k'\nwebhook_secret = ['" + SECRET + "', '" + SECRET + "']\n"
        "[pricing.m]\ninput_per_mtok = 1\noutput_per_mtok = 2\n"
        "[budget]\nusd_per_day = 10\nusd_per_month = 200.5\n"
    )
    settings = load_settings(write(tmp_path, text), environ={})
    assert (settings.provider.max_batches_in_flight, settings.provider.max_enqueued_tokens) == (3, 90000)
    assert (settings.provider.stuck_after_s, settings.provider.delete_files) == (600.0, "all")
    oa = settings.providers["oa"]
    assert (oa.delete_files, oa.stuck_after_s, oa.max_batches_in_flight) == ("inputs", 0.0, 0)
    assert oa.webhook_secrets == (Secret(SECRET), Secret(SECRET))
    assert (settings.budget.usd_per_day, settings.budget.usd_per_month) == (10.0, 200.5)


def test_max_request_bytes_defaults_to_32_mb_and_is_overridable(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[provider]\nmax_request_bytes = 0\nmax_batch_bytes = 500\n"), environ={})
    assert settings.provider.limits.max_request_bytes == 32_000_000
    # Validation keeps the provider's batch limits (config's only decide where a file is cut).
    assert settings.provider.validation_limits == PROVIDER_LIMITS["local"]
    path = write(tmp_path, "[provider]\nkind = 'together'\napi_key = 'k'\nmax_request_bytes = 50_000_000\n")
    settings = load_settings(path, environ={})
    assert settings.provider.limits.max_request_bytes == 50_000_000
    assert settings.provider.validation_limits == Limits(100_000_000, 50_000, max_request_bytes=50_000_000)
    with pytest.raises(ConfigError, match=r"provider\.max_request_bytes"):
        load_settings(write(tmp_path, "[provider]\nmax_request_bytes = -1\n"), environ={})


@pytest.mark.parametrize("bad", ["\\u0007", "\\t", " ", "\\u0085", "\\u00a0", "\\n"])
@pytest.mark.parametrize("where", ["webhooks", "allow", "base_url"])
def test_a_url_with_a_control_character_or_whitespace_stops_start_up(tmp_path: Path, bad: str, where: str) -> None:
    url = f"https://user:pa55word@hooks.example/x{bad}y?token=t0ken-value"
    text, key = {
        "webhooks": (f'[[webhooks]]\nurl = "{url}"\nsecret = "{SECRET}"\n', "webhooks[0].url"),
        "allow": (
            f'[inbox]\nallow_webhook_urls = ["https://ok.example/", "{url}"]\nwebhook_secret = "{SECRET}"\n',
            "inbox.allow_webhook_urls[1]",
        ),
        "base_url": (f'[provider]\nkind = "together"\napi_key = "k"\nbase_url = "{url}"\n', "provider.base_url"),
    }[where]
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    message = str(info.value)
    assert key in message and "control characters or whitespace" in message
    assert "pa55word" not in message and "t0ken-value" not in message


@pytest.mark.parametrize("entry", ["https://h.example/a\\\\..\\\\b", "https://h.example/a/..%2Fb"])
def test_an_allow_list_entry_without_a_normal_form_stops_start_up(tmp_path: Path, entry: str) -> None:
    text = f'[inbox]\nallow_webhook_urls = ["{entry}"]\nwebhook_secret = "{SECRET}"\n'
    with pytest.raises(ConfigError, match=r"inbox\.allow_webhook_urls\[0\]"):
        load_settings(write(tmp_path, text), environ={})


def test_credentials_in_a_bad_url_are_not_in_the_message(tmp_path: Path) -> None:
    text = f'[[webhooks]]\nurl = "ftp://user:pa55word@h/?token=t0ken-value"\nsecret = "{SECRET}"\n'
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    assert "webhooks[0].url" in str(info.value) and "***@h/?token=***" in str(info.value)


def test_credentials_in_a_webhook_url_are_kept_whole_in_the_settings(tmp_path: Path) -> None:
    url = "https://user:pa55word@hooks.example/x?token=t0ken-value"
    settings = load_settings(write(tmp_path, f'[[webhooks]]\nurl = "{url}"\nsecret = "{SECRET}"\n'), environ={})
    assert settings.webhooks[0].url == url


def test_plain_postgresql_url_uses_the_shipped_driver(tmp_path: Path) -> None:
    path = write(tmp_path, "database_url = 'postgresql://u@127.0.0.1:5432/db'\n")
    assert load_settings(path, environ={}).database_url == "postgresql+psycopg://u@127.0.0.1:5432/db"


def test_parse_override(tmp_path: Path) -> None:
    assert parse_override("polling.min_interval_s=0.5") == ("polling.min_interval_s", 0.5)
    assert parse_override("provider.kind=together") == ("provider.kind", "together")
    with pytest.raises(ConfigError):
        parse_override("nonsense")
    with pytest.raises(ConfigError, match=r"unknown key polling\.nope"):
        load_settings(write(tmp_path, ""), environ={}, overrides={"polling.nope": 1})


def test_the_metrics_token_is_read_from_its_file_and_needed_beyond_loopback(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t0ken-one\nt0ken-two\n", encoding="utf-8")
    settings = load_settings(write(tmp_path, "[metrics]\nlisten = '0.0.0.0:9464'\ntoken_file = 'token'\n"), environ={})
    assert settings.metrics.tokens == (Secret("t0ken-one"), Secret("t0ken-two"))  # a rotation
    assert "t0ken" not in repr(settings.metrics)
    for listen in ("127.0.0.1:9464", "[::1]:9464", "localhost:0", "127.0.0.2:9464"):
        assert load_settings(write(tmp_path, f"[metrics]\nlisten = '{listen}'\n"), environ={}).metrics.tokens == ()
    for listen in ("0.0.0.0:9464", "[::]:9464", "192.168.1.5:9464", "metrics.example.com:9464"):
        with pytest.raises(ConfigError, match=r"^metrics\.token_file: required when metrics\.listen is not a loopback"):
            load_settings(write(tmp_path, f"[metrics]\nlisten = '{listen}'\n"), environ={})
    with pytest.raises(ConfigError, match=r"^metrics\.token_file: cannot read .*missing"):
        load_settings(write(tmp_path, "[metrics]\ntoken_file = 'missing'\n"), environ={})
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^metrics\.token_file: .*empty"):
        load_settings(write(tmp_path, "[metrics]\ntoken_file = 'empty'\n"), environ={})
    # The environment names it as any other key; a token written into the config is refused.
    env = {"BATCHD_METRICS_TOKEN_FILE": str(tmp_path / "token"), "BATCHD_METRICS_LISTEN": '"0.0.0.0:1"'}
    assert len(load_settings(write(tmp_path, ""), environ=env).metrics.tokens) == 2
    with pytest.raises(ConfigError, match=r"unknown key metrics\.token$"):
        load_settings(write(tmp_path, "[metrics]\ntoken = 'inline'\n"), environ={})
