"""Settings are validated eagerly, read from the environment, and keep the key secret."""

from __future__ import annotations

import importlib.util
from typing import Any

import attrs
import httpx
import pytest

import whisperr

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
