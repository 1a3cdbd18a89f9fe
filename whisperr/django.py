"""Django: ``request.whisperr`` for the request's user, over one client per process.

    # settings.py
    WHISPERR_API_KEY = os.environ.get("WHISPERR_API_KEY")
    INSTALLED_APPS = [..., "whisperr.django.WhisperrConfig"]  # optional: the startup check
    MIDDLEWARE = [..., "django.contrib.auth.middleware.AuthenticationMiddleware",
                  "whisperr.django.WhisperrMiddleware"]

    # a view, sync or async
    request.whisperr.track("plan_upgraded", {"plan": "pro"})

The middleware binds the request's scope (:func:`whisperr.bind`) around the view, so
``whisperr.current()`` and ``get_client().current()`` anywhere below it track for the same
user; the scope is unbound when the view returns. The client is a :class:`whisperr.Whisperr`
(a sync ``Client`` underneath): it delivers from its own thread, under WSGI and ASGI alike, and
what is queued when a worker exits is delivered then (Python's exit, and ``uwsgi.atexit`` under
uWSGI). Only Django users import this module: ``import whisperr`` does not import Django.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from ._compat import Whisperr
from ._config import Settings
from ._errors import ConfigError
from ._scope import UserTracker, bind

__all__ = ["WhisperrConfig", "WhisperrMiddleware", "get_client"]

# The Django settings read, and the client keyword each one becomes (None: not given).
_SETTINGS = {
    "WHISPERR_API_KEY": "api_key",
    "WHISPERR_BASE_URL": "base_url",
    "WHISPERR_DISABLED": "disabled",
    "WHISPERR_APP_VERSION": "app_version",
}

_client: Whisperr | None = None
_lock = threading.Lock()


def _given() -> dict[str, Any]:
    """The client settings given in Django's settings; the others keep the client's defaults
    (or its ``WHISPERR_*`` environment variables)."""
    values = {field: getattr(settings, name, None) for name, field in _SETTINGS.items()}
    return {field: value for field, value in values.items() if value is not None}


def get_client() -> Whisperr:
    """The process-wide client, built on first use (from any thread) from the settings
    ``WHISPERR_API_KEY``, ``WHISPERR_BASE_URL``, ``WHISPERR_DISABLED``, ``WHISPERR_DEBUG`` and
    ``WHISPERR_APP_VERSION``; one left out (or None) falls back to its ``WHISPERR_*``
    environment variable, else the client's default. Other settings: environment variables.

    Raises:
        ConfigError: the settings are invalid, for example no API key anywhere and not
            ``WHISPERR_DISABLED`` (the system check ``whisperr.E001`` says so at startup).
    """
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                debug = bool(getattr(settings, "WHISPERR_DEBUG", False))
                _client = Whisperr(**_given(), debug=debug)
    return _client


def _default_resolve_user(request: Any) -> str | None:
    """``request.user.pk`` as a string when someone is signed in, else None."""
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return str(user.pk)
    return None


def _request_id(request: Any) -> str | None:
    """The request's ``X-Request-ID`` header (added to each event's context), else None."""
    value: str | None = request.META.get("HTTP_X_REQUEST_ID") or None
    return value


class WhisperrMiddleware:
    """Attaches ``request.whisperr``, a :class:`whisperr.UserTracker` for the request's user.

    The user is ``request.user.pk`` when authenticated (place the middleware after
    ``AuthenticationMiddleware``), or what the callable named by ``WHISPERR_RESOLVE_USER``
    returns (``resolve(request) -> str | None``); under ASGI it is resolved in a thread, as
    Django's ORM requires. A user known only later (an authentication step in the view) can
    be set with :func:`whisperr.bind_user`: ``request.whisperr`` follows it. Sync and async.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.client = get_client()
        resolver = getattr(settings, "WHISPERR_RESOLVE_USER", None)
        self.resolve_user: Callable[[Any], str | None] = (
            import_string(resolver) if resolver else _default_resolve_user
        )
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self._acall(request)
        with bind(self.resolve_user(request), request_id=_request_id(request)) as scope:
            request.whisperr = UserTracker(self.client, scope)
            return self.get_response(request)

    async def _acall(self, request: Any) -> Any:
        user_id = await sync_to_async(self.resolve_user)(request)
        with bind(user_id, request_id=_request_id(request)) as scope:
            request.whisperr = UserTracker(self.client, scope)
            return await self.get_response(request)


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """The system check ``whisperr.E001``: the client cannot be built from the settings (no
    API key, unless ``WHISPERR_DISABLED``; or another invalid value)."""
    try:
        Settings(**_given())
    except ConfigError as exc:
        hint = (
            "WHISPERR_* settings are read from settings.py, else from the environment; "
            "WHISPERR_DISABLED = True sends nothing (tests, local development)."
        )
        return [checks.Error(f"Whisperr: {exc}", hint=hint, id="whisperr.E001")]
    return []


# Registered when this module is imported: by INSTALLED_APPS (so that ``manage.py check``,
# ``runserver`` and ``migrate`` run it) or by the middleware's import.
checks.register(check_settings)


class WhisperrConfig(AppConfig):  # type: ignore[misc]  # Django has no type information
    """``"whisperr.django.WhisperrConfig"`` in ``INSTALLED_APPS``: the settings check runs at
    startup. It has no models."""

    name = "whisperr.django"
    label = "whisperr"
    verbose_name = "Whisperr"


def _deliver_at_uwsgi_exit() -> None:
    """Under uWSGI, close the client from ``uwsgi.atexit`` (chaining a hook set before).

    uWSGI calls that hook when a worker stops, before it tears Python down, and may skip the
    teardown, and with it Python's ``atexit`` (``--skip-atexit-teardown``).
    """
    try:
        uwsgi: Any = importlib.import_module("uwsgi")  # importable only inside a uWSGI process
    except ImportError:
        return
    previous: Callable[[], object] | None = getattr(uwsgi, "atexit", None)

    def at_exit() -> None:
        try:
            if _client is not None:
                _client.shutdown()
        finally:
            if previous is not None:
                previous()

    uwsgi.atexit = at_exit


_deliver_at_uwsgi_exit()
