"""Settings are validated eagerly, read from the environment, and keep the key secret."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import pytest

import whisperr
from whisperr._config import _ENV_FIELDS, KeylessSettingsArgs, SettingsArgs

from .conftest import API_KEY


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"api_key": None}, "api_key is required"),
        ({"api_key": ""}, "api_key is required"),
        ({"api_key": "wrk_ spaced"}, "without whitespace"),
        ({"api_key": "wrk_clé"}, "ASCII"),
        ({"max_batch_size": 501}, "between 1 and 500"),
        ({"max_batch_size": 0}, "between 1 and 500"),
        ({"max_batch_bytes": 100}, ">= 4096"),
        ({"flush_interval": 0}, "flush_interval must be > 0"),
        ({"max_queue_size": 0}, "max_queue_size must be > 0"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"request_timeout": 0}, "request_timeout must be > 0"),
        ({"max_concurrency": 0}, "max_concurrency must be > 0"),
        ({"overflow": "block"}, "drop_oldest"),
        ({"base_url": "ftp://x"}, "http"),
        ({"base_url": "http://api.example.com"}, "clear text"),
        ({"http_client": httpx.AsyncClient(), "transport": httpx.MockTransport(print)}, "not both"),
        ({"base_url": "https://u:p@api.example.com"}, "no user-info"),
        ({"base_url": "https://api.example.com/?region=eu"}, "query"),
        ({"base_url": "https://api.example.com/#top"}, "fragment"),
        ({"base_url": "https://api.example.com/v1"}, "must not end in /v1"),
        ({"base_url": "https://api.example.com/v1/"}, "must not end in /v1"),
        ({"proxy": "ftp://127.0.0.1:21"}, "proxy must be"),
        ({"verify": "/no/such/ca.pem"}, "verify must be"),
        ({"verify": 1}, "verify must be"),
        ({"transport": httpx.MockTransport(print), "proxy": "http://127.0.0.1:3128"}, "default"),
        ({"http_client": httpx.AsyncClient(), "verify": False}, "default transport"),
    ],
)
def test_invalid_settings_raise_config_error(overrides: dict[str, Any], match: str) -> None:
    """Each invalid setting raises ConfigError (a ValueError) naming it, at construction."""
    with pytest.raises(whisperr.ConfigError, match=match) as info:
        whisperr.Settings(**({"api_key": API_KEY} | overrides))
    assert isinstance(info.value, ValueError)
    assert API_KEY not in str(info.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8787", "http://localhost:1/", "http://[::1]:9"])
def test_plain_http_is_fine_to_loopback(url: str) -> None:
    """http:// to a loopback host is allowed (the local server); a trailing / is stripped."""
    assert whisperr.Settings(api_key=API_KEY, base_url=url).base_url == url.rstrip("/")


def test_plain_http_to_remote_needs_explicit_consent() -> None:
    """allow_insecure_http=True lets a user choose plain http to a remote host."""
    s = whisperr.Settings(api_key=API_KEY, base_url="http://10.1.2.3", allow_insecure_http=True)
    assert s.base_url == "http://10.1.2.3"


def test_a_base_url_path_prefix_is_kept_without_its_slash() -> None:
    """A gateway prefix works: requests go to /whisperr/v1/events/batch (test_transport.py)."""
    url = "https://gw.example.com/whisperr/"
    assert whisperr.Settings(api_key=API_KEY, base_url=url).base_url == url.rstrip("/")


def test_a_socks_proxy_without_socks_support_is_refused_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From proxy= or ALL_PROXY alike; the message says what to install, not the password."""
    if importlib.util.find_spec("socksio") is not None:
        pytest.skip("socksio is installed here")
    with pytest.raises(whisperr.ConfigError, match=r"pip install 'httpx\[socks\]'") as info:
        whisperr.AsyncClient(api_key=API_KEY, proxy="socks5://user:pw@127.0.0.1:1080")
    assert "pw" not in str(info.value)
    monkeypatch.setenv("ALL_PROXY", "socks5h://127.0.0.1:1080")
    with pytest.raises(whisperr.ConfigError, match="SOCKS"):
        whisperr.AsyncClient(api_key=API_KEY)


def test_network_settings_from_the_environment(tmp_path: Any) -> None:
    """WHISPERR_TRUST_ENV, WHISPERR_PROXY and WHISPERR_VERIFY (a boolean or a path)."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    env = {
        "WHISPERR_API_KEY": API_KEY,
        "WHISPERR_TRUST_ENV": "false",
        "WHISPERR_PROXY": "http://127.0.0.1:3128",
        "WHISPERR_VERIFY": str(bundle),
    }
    s = whisperr.Settings.from_env(env)
    assert (s.trust_env, s.proxy, s.verify) == (False, "http://127.0.0.1:3128", str(bundle))
    assert whisperr.Settings.from_env(env | {"WHISPERR_VERIFY": "off"}).verify is False
    defaults = whisperr.Settings.from_env({"WHISPERR_API_KEY": API_KEY})
    assert (defaults.trust_env, defaults.proxy, defaults.verify) == (True, None, True)


def test_repr_hides_the_key() -> None:
    """The key is not in the settings' repr."""
    assert API_KEY not in repr(whisperr.Settings(api_key=API_KEY))


def test_settings_are_frozen_and_evolvable() -> None:
    """Settings cannot change in place; attrs.evolve makes variants (validated again)."""
    s = whisperr.Settings(api_key=API_KEY)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.flush_interval = 3  # type: ignore[misc]
    assert attrs.evolve(s, flush_interval=3).flush_interval == 3
    with pytest.raises(whisperr.ConfigError):
        attrs.evolve(s, max_batch_size=1000)


def test_from_env_reads_whisperr_variables() -> None:
    """from_env() reads WHISPERR_* variables; keyword arguments win."""
    env = {
        "WHISPERR_API_KEY": API_KEY,
        "WHISPERR_FLUSH_INTERVAL": "2.5",
        "WHISPERR_MAX_BATCH_SIZE": "100",
        "WHISPERR_STRICT": "false",
        "WHISPERR_APP_VERSION": "1.2.3",
    }
    s = whisperr.Settings.from_env(env, max_batch_size=50)
    assert (s.api_key, s.flush_interval, s.max_batch_size, s.strict, s.app_version) == (
        API_KEY,
        2.5,
        50,
        False,
        "1.2.3",
    )


def test_from_env_names_the_bad_variable() -> None:
    """A variable that does not parse is named in the error."""
    with pytest.raises(whisperr.ConfigError, match="WHISPERR_MAX_RETRIES"):
        whisperr.Settings.from_env({"WHISPERR_API_KEY": API_KEY, "WHISPERR_MAX_RETRIES": "many"})


def test_client_accepts_settings_and_overrides() -> None:
    """AsyncClient takes a Settings, keyword overrides, or both."""
    base = whisperr.Settings(api_key=API_KEY)
    client = whisperr.AsyncClient(base, flush_interval=0.5)
    assert client.settings.flush_interval == 0.5
    assert client.settings.api_key == API_KEY
    assert API_KEY not in repr(client)


# A value of the wrong type for every field but meter_provider (anything goes there); a field
# may have several rows. Each is refused with a ConfigError whose message starts with the name.
WRONG_TYPES: list[tuple[str, object]] = [
    ("api_key", 123),
    ("api_key", API_KEY.encode()),
    ("base_url", 8787),
    ("base_url", b"https://api.example.com"),
    ("app_version", 1.2),
    ("max_batch_size", "100"),
    ("max_batch_size", 100.0),
    ("max_batch_size", True),
    ("max_batch_bytes", "1mb"),
    ("flush_at", "10"),
    ("flush_at", 10.5),
    ("flush_interval", "1"),
    ("flush_interval", True),
    ("flush_interval", None),
    ("max_queue_size", "1000"),
    ("max_queue_bytes", [1]),
    ("overflow", 1),
    ("overflow", ["drop_oldest"]),
    ("max_retries", "3"),
    ("max_retries", False),
    ("backoff_base", "0.5"),
    ("backoff_cap", {"s": 30}),
    ("request_timeout", "10"),
    ("shutdown_timeout", b"10"),
    ("max_concurrency", 2.0),
    ("on_error", "log"),
    ("before_send", "scrub"),
    ("pii", True),
    ("pii", ["raise"]),
    ("metrics", "yes"),
    ("metrics", 1),
    ("strict", "false"),
    ("disabled", "true"),
    ("allow_insecure_http", 1),
    ("trust_env", "no"),
    ("proxy", 3128),
    ("proxy", b"http://user:pw@127.0.0.1:3128"),
    ("verify", 1),
    ("verify", None),
    ("spool_path", 1),
    ("spool_path", ""),
    ("spool_mode", "sometimes"),
    ("spool_mode", True),
    ("spool_max_bytes", "1gb"),
    ("spool_sync_interval", "0.2"),
    ("http_client", httpx.MockTransport(print)),  # a transport where the client goes
    ("http_client", "https://api.example.com"),
    ("transport", httpx.BaseTransport()),  # a sync transport
    ("transport", "http://127.0.0.1:8787"),
    ("clock", 0.0),
    ("sleep", 1),
]


def test_every_field_has_a_wrong_type_case() -> None:
    """WRONG_TYPES covers each field (meter_provider takes any object)."""
    fields = {field.name for field in attrs.fields(whisperr.Settings)}
    assert {name for name, _ in WRONG_TYPES} == fields - {"meter_provider"}


def _new(**overrides: Any) -> whisperr.Settings:
    return whisperr.Settings(**({"api_key": API_KEY} | overrides))


def _evolved(**overrides: Any) -> whisperr.Settings:
    return attrs.evolve(whisperr.Settings(api_key=API_KEY), **overrides)


@pytest.mark.parametrize("build", [_new, _evolved], ids=["Settings", "evolve"])
@pytest.mark.parametrize(("name", "value"), WRONG_TYPES)
def test_a_wrong_type_is_a_config_error_naming_the_setting(
    name: str, value: object, build: Callable[..., whisperr.Settings]
) -> None:
    """Never a TypeError or AttributeError from comparing or calling it; secrets stay out."""
    with pytest.raises(whisperr.ConfigError) as info:
        build(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name} must be"), message
    assert API_KEY not in message
    assert "pw" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"flush_interval": "1"}, "flush_interval must be a number of seconds, got '1' (str)"),
        ({"max_retries": True}, "max_retries must be an integer, got True (bool)"),
        ({"flush_at": "10"}, "flush_at must be an integer or None, got '10' (str)"),
        ({"strict": "false"}, "strict must be True or False, got 'false' (str)"),
        ({"app_version": 1.2}, "app_version must be a string or None, got 1.2 (float)"),
        ({"clock": 0.0}, "clock must be a callable, got 0.0 (float)"),
        ({"api_key": 123}, "api_key must be a string, got int"),
        ({"proxy": 3128}, "proxy must be a URL string or None, got int"),
        (
            {"transport": "http://127.0.0.1:8787"},
            "transport must be an httpx.AsyncBaseTransport or None, got "
            "'http://127.0.0.1:8787' (str)",
        ),
    ],
)
def test_a_wrong_type_message_says_what_was_expected_and_got(
    overrides: dict[str, Any], message: str
) -> None:
    """The message: the setting, what it takes, and the value's repr and type (not a secret's)."""
    with pytest.raises(whisperr.ConfigError) as info:
        whisperr.Settings(**({"api_key": API_KEY} | overrides))
    assert str(info.value) == message


def test_a_wrong_type_of_disabled_is_named_without_a_key() -> None:
    """disabled=0 is no consent to run without a key, nor is the missing key the error."""
    with pytest.raises(whisperr.ConfigError, match=r"^disabled must be True or False, got 0"):
        whisperr.Settings.from_env({}, disabled=0)  # type: ignore[arg-type]
    with pytest.raises(whisperr.ConfigError, match="api_key is required"):
        whisperr.Settings.from_env({}, disabled=False)


def test_the_clients_refuse_a_wrong_type_with_config_error() -> None:
    """AsyncClient, Client and from_env() validate the same way."""
    with pytest.raises(whisperr.ConfigError, match="flush_interval must be a number of seconds"):
        whisperr.AsyncClient(API_KEY, flush_interval="1")  # type: ignore[arg-type]
    with pytest.raises(whisperr.ConfigError, match="max_batch_size must be an integer"):
        whisperr.Client(API_KEY, max_batch_size="100")  # type: ignore[arg-type]
    with pytest.raises(whisperr.ConfigError, match="disabled must be True or False"):
        whisperr.Settings.from_env({}, api_key=API_KEY, disabled="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {"flush_interval": 1, "backoff_base": 0, "request_timeout": 2.5, "shutdown_timeout": 0},
        {"flush_at": 10, "max_retries": 0, "app_version": "1.2.3", "proxy": None},
        {"on_error": print, "before_send": None, "clock": lambda: 0.0, "metrics": False},
        {"http_client": None, "transport": httpx.MockTransport(print), "pii": None},
        {"meter_provider": object(), "overflow": "drop_newest", "pii": "drop_fields"},
    ],
)
def test_right_types_pass(overrides: dict[str, Any]) -> None:
    """An int is a number of seconds; None where a field allows it."""
    s = whisperr.Settings(**({"api_key": API_KEY} | overrides))
    assert {name: getattr(s, name) for name in overrides} == overrides


def test_every_environment_variable_parses_to_its_fields_type(tmp_path: Any) -> None:
    """WHISPERR_* values are parsed (as before) into values the type checks accept."""
    env = {
        "WHISPERR_API_KEY": API_KEY,
        "WHISPERR_BASE_URL": "https://gw.example.com/whisperr/",
        "WHISPERR_APP_VERSION": "1.2.3",
        "WHISPERR_MAX_BATCH_SIZE": "100",
        "WHISPERR_MAX_BATCH_BYTES": "500000",
        "WHISPERR_FLUSH_AT": "10",
        "WHISPERR_FLUSH_INTERVAL": "2",
        "WHISPERR_MAX_QUEUE_SIZE": "1000",
        "WHISPERR_MAX_QUEUE_BYTES": "1000000",
        "WHISPERR_OVERFLOW": "drop_newest",
        "WHISPERR_MAX_RETRIES": "0",
        "WHISPERR_BACKOFF_BASE": "0.1",
        "WHISPERR_BACKOFF_CAP": "5",
        "WHISPERR_REQUEST_TIMEOUT": "3",
        "WHISPERR_SHUTDOWN_TIMEOUT": "0",
        "WHISPERR_MAX_CONCURRENCY": "4",
        "WHISPERR_STRICT": "off",
        "WHISPERR_DISABLED": "no",
        "WHISPERR_ALLOW_INSECURE_HTTP": "yes",
        "WHISPERR_TRUST_ENV": "0",
        "WHISPERR_PROXY": "http://127.0.0.1:3128",
        "WHISPERR_VERIFY": str(tmp_path),
        "WHISPERR_PII": "drop_fields",
        "WHISPERR_METRICS": "false",
        "WHISPERR_SPOOL_PATH": str(tmp_path / "spool.db"),
        "WHISPERR_SPOOL_MODE": "always",
        "WHISPERR_SPOOL_MAX_BYTES": "1000000",
        "WHISPERR_SPOOL_SYNC_INTERVAL": "0.5",
    }
    assert {name[len("WHISPERR_") :].lower() for name in env} == set(_ENV_FIELDS)
    s = whisperr.Settings.from_env(env)
    assert (s.flush_interval, s.max_batch_size, s.backoff_cap, s.strict) == (2.0, 100, 5.0, False)
    assert (s.overflow, s.pii, s.verify, s.base_url) == (
        "drop_newest",
        "drop_fields",
        str(tmp_path),
        "https://gw.example.com/whisperr",
    )
    assert whisperr.Settings.from_env(env | {"WHISPERR_PII": ""}).pii is None
    assert (s.spool_path, s.spool_mode, s.spool_max_bytes, s.spool_sync_interval) == (
        str(tmp_path / "spool.db"),
        "always",
        1_000_000,
        0.5,
    )


def test_settings_args_has_every_field_with_its_type() -> None:
    """SettingsArgs (the typed **overrides) and KeylessSettingsArgs (init's) follow Settings."""
    fields = {field.name: field.type for field in attrs.fields(whisperr.Settings)}
    annotations = {
        name: getattr(hint, "__forward_arg__", hint)  # a ForwardRef: the annotation's text
        for name, hint in SettingsArgs.__annotations__.items()
    }
    assert annotations == fields
    assert SettingsArgs.__required_keys__ == frozenset()
    assert set(KeylessSettingsArgs.__annotations__) == set(fields) - {"api_key"}
