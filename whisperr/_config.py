"""Settings: one frozen, eagerly validated record of everything a client can be told."""

from __future__ import annotations

import ipaddress
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

import anyio
import attrs
import httpx

from ._errors import ConfigError
from ._models import DeliveryReport

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no dependency: the annotations are never evaluated
    from typing_extensions import Unpack

DEFAULT_BASE_URL = "https://api.whisperr.net"
# The server's hard cap: at most 500 events per batch request (WIRE.md §1).
MAX_BATCH_SIZE = 500
DEFAULT_MAX_BATCH_BYTES = 1_000_000
# Wait at most this long for a batch to fill. Low enough that a quiet service still ships
# events within a second; a full batch never waits for it.
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MAX_QUEUE_SIZE = 100_000
# About 64 MB of queued events: a full default queue of small events stays well below it; a
# queue of large events during an outage stops growing there.
DEFAULT_MAX_QUEUE_BYTES = 64 * 1024 * 1024
DEFAULT_SPOOL_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_SPOOL_SYNC_INTERVAL = 0.2
DEFAULT_MAX_RETRIES = 6
DEFAULT_BACKOFF_BASE = 0.5
DEFAULT_BACKOFF_CAP = 30.0
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_MAX_CONCURRENCY = 16

Overflow = Literal["drop_oldest", "drop_newest"]
SpoolMode = Literal["on_failure", "always"]
Pii = Literal["raise", "drop_fields"]
# The before_send hook: the event as a mapping with the wire's keys; it returns the event to
# capture (the same mapping changed, or another) or None to drop it.
BeforeSend = Callable[[dict[str, Any]], "Mapping[str, Any] | None"]


class OnError(Protocol):
    """The ``on_error`` hook: a plain or ``async`` callable taking a :class:`DeliveryReport`."""

    def __call__(self, report: DeliveryReport, /) -> Awaitable[None] | None: ...


_Validator = Callable[[object, "attrs.Attribute[Any]", Any], None]


def _wrong_type(name: str, what: str, value: object) -> ConfigError:
    return ConfigError(f"{name} must be {what}, got {value!r:.200} ({type(value).__name__})")


def _of_type(
    types: type | tuple[type, ...], what: str, *, optional: bool = False, bools: bool = False
) -> _Validator:
    """A validator: the value is an instance of ``types`` (never a bool unless ``bools``).

    Python's bool is an int, but ``max_retries=True`` is a mistake, not a count.
    """
    if optional:
        what += " or None"

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, types) and (bools or value.__class__ is not bool):
            return
        if value is None and optional:
            return
        raise _wrong_type(attribute.name, what, value)

    return check


def _one_of(*choices: object) -> _Validator:
    """A validator: the value is one of ``choices`` (looked up in a tuple, so that an
    unhashable value is refused like any other)."""
    names = [repr(choice) for choice in choices]
    what = f"{', '.join(names[:-1])} or {names[-1]}"

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise _wrong_type(attribute.name, what, value)

    return check


def _callable(*, optional: bool = False) -> _Validator:
    what = "a callable or None" if optional else "a callable"

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not callable(value) and not (value is None and optional):
            raise _wrong_type(attribute.name, what, value)

    return check


_INT = _of_type(int, "an integer")
_OPTIONAL_INT = _of_type(int, "an integer", optional=True)
_SECONDS = _of_type((int, float), "a number of seconds")
_BOOL = _of_type(bool, "True or False", bools=True)
_STR = _of_type(str, "a string")
_OPTIONAL_STR = _of_type(str, "a string", optional=True)
_OPTIONAL_CALLABLE = _callable(optional=True)
_CALLABLE = _callable()


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{attribute.name} must be >= 0, got {value!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _normalise_url(url: str) -> str:
    # Not a string: left as it is, for the type check to name it (a converter runs first).
    return url.rstrip("/") if isinstance(url, str) else url


def _verify(raw: str) -> bool | str:
    """``WHISPERR_VERIFY``: a boolean, or the path of a CA bundle file or directory."""
    try:
        return _bool(raw)
    except ValueError:
        return raw


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


# The built-in default of every field that can come from the environment.
_BUILT_IN: dict[str, Any] = {}


def _env(name: str, default: Any) -> Any:
    """A field default read from ``WHISPERR_<NAME>`` when it is set (see ``_ENV_FIELDS``)."""
    _BUILT_IN[name] = default
    return attrs.Factory(lambda: _parse_env(os.environ, name, default))


def _parse_env(env: Mapping[str, str], name: str, default: Any) -> Any:
    variable = f"WHISPERR_{name.upper()}"
    raw = env.get(variable)
    if raw is None:
        return default
    try:
        return _ENV_FIELDS[name](raw)
    except ValueError:
        raise ConfigError(f"{variable} does not parse: {raw!r}") from None


@attrs.frozen(kw_only=True)
class Settings:
    """Everything an :class:`AsyncClient` can be configured with.

    Every field is also accepted as a keyword argument of ``AsyncClient(...)``, ``Client(...)``
    and ``whisperr.init(...)``. A plain field not passed is read from ``WHISPERR_<NAME>`` when
    that variable is set (``WHISPERR_API_KEY``, ``WHISPERR_BASE_URL``, ...), else it takes its
    default: an explicit argument always wins. Durations are in seconds. Derive variants with
    ``attrs.evolve``.

    Raises:
        ConfigError: a value is invalid or of the wrong type (the message names the setting),
            or a ``WHISPERR_*`` variable does not parse.
    """

    api_key: str | None = attrs.field(default=_env("api_key", None), repr=False)
    base_url: str = attrs.field(
        default=_env("base_url", DEFAULT_BASE_URL), converter=_normalise_url, validator=_STR
    )
    app_version: str | None = attrs.field(
        default=_env("app_version", None), validator=_OPTIONAL_STR
    )
    max_batch_size: int = attrs.field(
        default=_env("max_batch_size", MAX_BATCH_SIZE), validator=_INT
    )
    max_batch_bytes: int = attrs.field(
        default=_env("max_batch_bytes", DEFAULT_MAX_BATCH_BYTES), validator=_INT
    )
    flush_at: int | None = attrs.field(default=_env("flush_at", None), validator=_OPTIONAL_INT)
    flush_interval: float = attrs.field(
        default=_env("flush_interval", DEFAULT_FLUSH_INTERVAL), validator=[_SECONDS, _positive]
    )
    max_queue_size: int = attrs.field(
        default=_env("max_queue_size", DEFAULT_MAX_QUEUE_SIZE), validator=[_INT, _positive]
    )
    max_queue_bytes: int = attrs.field(
        default=_env("max_queue_bytes", DEFAULT_MAX_QUEUE_BYTES), validator=[_INT, _positive]
    )
    overflow: Overflow = attrs.field(
        default=_env("overflow", "drop_oldest"), validator=_one_of("drop_oldest", "drop_newest")
    )
    max_retries: int = attrs.field(
        default=_env("max_retries", DEFAULT_MAX_RETRIES), validator=[_INT, _non_negative]
    )
    backoff_base: float = attrs.field(
        default=_env("backoff_base", DEFAULT_BACKOFF_BASE), validator=[_SECONDS, _non_negative]
    )
    backoff_cap: float = attrs.field(
        default=_env("backoff_cap", DEFAULT_BACKOFF_CAP), validator=[_SECONDS, _non_negative]
    )
    request_timeout: float = attrs.field(
        default=_env("request_timeout", DEFAULT_REQUEST_TIMEOUT), validator=[_SECONDS, _positive]
    )
    shutdown_timeout: float = attrs.field(
        default=_env("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT),
        validator=[_SECONDS, _non_negative],
    )
    max_concurrency: int = attrs.field(
        default=_env("max_concurrency", DEFAULT_MAX_CONCURRENCY), validator=[_INT, _positive]
    )
    on_error: OnError | None = attrs.field(default=None, validator=_OPTIONAL_CALLABLE)
    before_send: BeforeSend | None = attrs.field(default=None, validator=_OPTIONAL_CALLABLE)
    pii: Pii | None = attrs.field(
        default=_env("pii", None), validator=_one_of("raise", "drop_fields", None)
    )
    metrics: bool = attrs.field(default=_env("metrics", False), validator=_BOOL)
    meter_provider: Any = None
    strict: bool = attrs.field(default=_env("strict", True), validator=_BOOL)
    disabled: bool = attrs.field(default=_env("disabled", False), validator=_BOOL)
    allow_insecure_http: bool = attrs.field(
        default=_env("allow_insecure_http", False), validator=_BOOL
    )
    trust_env: bool = attrs.field(default=_env("trust_env", True), validator=_BOOL)
    proxy: str | None = attrs.field(default=_env("proxy", None))
    verify: bool | str | ssl.SSLContext = attrs.field(default=_env("verify", True))
    spool_path: str | os.PathLike[str] | None = attrs.field(default=_env("spool_path", None))
    spool_mode: SpoolMode = attrs.field(
        default=_env("spool_mode", "on_failure"), validator=_one_of("on_failure", "always")
    )
    spool_max_bytes: int = attrs.field(
        default=_env("spool_max_bytes", DEFAULT_SPOOL_MAX_BYTES), validator=[_INT, _positive]
    )
    spool_sync_interval: float = attrs.field(
        default=_env("spool_sync_interval", DEFAULT_SPOOL_SYNC_INTERVAL),
        validator=[_SECONDS, _positive],
    )
    http_client: httpx.AsyncClient | None = attrs.field(
        default=None, validator=_of_type(httpx.AsyncClient, "an httpx.AsyncClient", optional=True)
    )
    transport: httpx.AsyncBaseTransport | None = attrs.field(
        default=None,
        validator=_of_type(httpx.AsyncBaseTransport, "an httpx.AsyncBaseTransport", optional=True),
    )
    clock: Callable[[], float] = attrs.field(default=time.time, validator=_CALLABLE)
    sleep: Callable[[float], Awaitable[None]] = attrs.field(
        default=anyio.sleep, validator=_CALLABLE
    )

    @api_key.validator
    def _check_api_key(self, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is None or value == "":
            if self.disabled is False:  # not a bool: its own check says so
                raise ConfigError("api_key is required (or set WHISPERR_API_KEY, or disabled=True)")
            return
        if not isinstance(value, str):  # the value stays out of the message: it is a secret
            raise ConfigError(f"api_key must be a string, got {type(value).__name__}")
        if value != value.strip() or any(c.isspace() for c in value):
            raise ConfigError("api_key must be a string without whitespace")
        if not value.isascii() or not value.isprintable():
            raise ConfigError("api_key must be printable ASCII (it travels in an HTTP header)")

    @base_url.validator
    def _check_base_url(self, attribute: attrs.Attribute[Any], value: str) -> None:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"base_url is not a valid URL ({exc}): {value!r:.200}") from None
        if url.scheme not in {"http", "https"} or not url.host:
            raise ConfigError(f"base_url must be an http(s) URL, got {value!r:.200}")
        if url.userinfo or url.query or url.fragment or "?" in value or "#" in value:
            raise ConfigError(
                "base_url may have a path prefix but no user-info, query or fragment, got "
                f"{url.copy_with(username=None, password=None)!s:.200} (user-info left out)"
            )
        if url.path.rstrip("/").endswith("/v1"):
            raise ConfigError(
                "base_url must not end in /v1: the client adds /v1/events/... itself, "
                f"got {value!r:.200}"
            )
        insecure = url.scheme == "http" and not _is_loopback(url.host)
        if insecure and not self.allow_insecure_http:
            raise ConfigError(
                "base_url uses plain http:// to a non-loopback host, which would send the API key "
                "in clear text; use https:// or pass allow_insecure_http=True"
            )

    @proxy.validator
    def _check_proxy(self, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is None:
            return
        if not isinstance(value, str):  # the value stays out of the message: it may hold a password
            raise ConfigError(f"proxy must be a URL string or None, got {type(value).__name__}")
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in {"http", "https", "socks5", "socks5h"} or not url.host:
            raise ConfigError("proxy must be an http://, https:// or socks5:// URL")

    @verify.validator
    def _check_verify(self, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, (bool, ssl.SSLContext)):
            return
        if not isinstance(value, str) or not os.path.exists(value):
            raise ConfigError(
                "verify must be True, False, an ssl.SSLContext, or the path of a CA bundle file "
                f"or directory that exists, got {value!r:.200}"
            )

    @max_batch_size.validator
    def _check_batch_size(self, attribute: attrs.Attribute[Any], value: int) -> None:
        if not 1 <= value <= MAX_BATCH_SIZE:
            raise ConfigError(
                f"max_batch_size must be between 1 and {MAX_BATCH_SIZE}, got {value!r}"
            )

    @flush_at.validator
    def _check_flush_at(self, attribute: attrs.Attribute[Any], value: int | None) -> None:
        if value is not None and not 1 <= value <= self.max_batch_size:
            raise ConfigError(
                f"flush_at must be between 1 and max_batch_size={self.max_batch_size}, "
                f"got {value!r}"
            )

    @property
    def batch_due_at(self) -> int:
        """How many queued events send a batch at once: ``flush_at``, else a full batch."""
        return self.max_batch_size if self.flush_at is None else self.flush_at

    @max_batch_bytes.validator
    def _check_batch_bytes(self, attribute: attrs.Attribute[Any], value: int) -> None:
        if value < 4096:
            raise ConfigError(f"max_batch_bytes must be >= 4096, got {value!r}")

    @spool_path.validator
    def _check_spool_path(self, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
            raise ConfigError(
                f"spool_path must be a file path (str or os.PathLike) or None, got {value!r:.200}"
            )

    @property
    def metrics_on(self) -> bool:
        """Whether the client reports OpenTelemetry metrics (``metrics=True`` or a provider)."""
        return self.metrics or self.meter_provider is not None

    @http_client.validator
    def _check_http(self, attribute: attrs.Attribute[Any], value: httpx.AsyncClient | None) -> None:
        if value is not None and self.transport is not None:
            raise ConfigError("pass http_client or transport, not both")
        if (value is not None or self.transport is not None) and (
            self.proxy is not None or self.verify is not True
        ):
            raise ConfigError(
                "proxy and verify configure the default transport: with http_client or "
                "transport, configure those instead"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Unpack[SettingsArgs]
    ) -> Settings:
        """Build settings from ``WHISPERR_*`` variables of ``environ``, then ``overrides``.

        ``Settings(**overrides)`` reads ``os.environ`` the same way; this form takes another
        mapping (only it is read). Keyword arguments win over the environment.

        Raises:
            ConfigError: a variable does not parse, or the result is invalid.
        """
        env = os.environ if environ is None else environ
        values = {
            name: _parse_env(env, name, default)
            for name, default in _BUILT_IN.items()
            if name not in overrides
        }
        return cls(**values, **overrides)


class KeylessSettingsArgs(TypedDict, total=False):
    """Every :class:`Settings` field but ``api_key``, as keyword arguments.

    The keywords of ``whisperr.init(api_key, **settings)``, which takes the key by name.
    """

    base_url: str
    app_version: str | None
    max_batch_size: int
    max_batch_bytes: int
    flush_at: int | None
    flush_interval: float
    max_queue_size: int
    max_queue_bytes: int
    overflow: Overflow
    max_retries: int
    backoff_base: float
    backoff_cap: float
    request_timeout: float
    shutdown_timeout: float
    max_concurrency: int
    on_error: OnError | None
    before_send: BeforeSend | None
    pii: Pii | None
    metrics: bool
    meter_provider: Any
    strict: bool
    disabled: bool
    allow_insecure_http: bool
    trust_env: bool
    proxy: str | None
    verify: bool | str | ssl.SSLContext
    spool_path: str | os.PathLike[str] | None
    spool_mode: SpoolMode
    spool_max_bytes: int
    spool_sync_interval: float
    http_client: httpx.AsyncClient | None
    transport: httpx.AsyncBaseTransport | None
    clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]


class SettingsArgs(KeylessSettingsArgs, total=False):
    """Every :class:`Settings` field, as keyword arguments (``**overrides: Unpack[SettingsArgs]``).

    What ``AsyncClient(...)``, ``Client(...)`` and ``Settings.from_env(...)`` accept, so that a
    type checker and an IDE know each keyword and its type. A test keeps it in step with
    :class:`Settings`.
    """

    api_key: str | None


_ENV_FIELDS: dict[str, Callable[[str], Any]] = {
    "api_key": str,
    "base_url": str,
    "app_version": str,
    "max_batch_size": int,
    "max_batch_bytes": int,
    "flush_at": int,
    "flush_interval": float,
    "max_queue_size": int,
    "max_queue_bytes": int,
    "overflow": str,
    "max_retries": int,
    "backoff_base": float,
    "backoff_cap": float,
    "request_timeout": float,
    "shutdown_timeout": float,
    "max_concurrency": int,
    "strict": _bool,
    "disabled": _bool,
    "allow_insecure_http": _bool,
    "trust_env": _bool,
    "proxy": str,
    "verify": _verify,
    "pii": lambda raw: raw or None,
    "metrics": _bool,
    "spool_path": lambda raw: raw or None,
    "spool_mode": str,
    "spool_max_bytes": int,
    "spool_sync_interval": float,
}
