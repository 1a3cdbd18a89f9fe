"""The current request's user: a context variable that integrations set and calls read.

A framework integration binds a :class:`RequestScope` (the user the request is for, and its
request id) around each request; code anywhere below it, in the request's task, its threads
and the tasks it starts, tracks for that user with :func:`whisperr.current` (or the
``request.whisperr`` / ``request.state.whisperr`` the integration attaches) without passing
ids around. The scope is a mutable holder, so a user resolved later in the request (an auth
dependency) is seen by everything else of that request.

Lifetime: one scope per request.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import attrs


@attrs.define
class RequestScope:
    """Who the current request is for; ``user_id`` None while nobody is signed in."""

    user_id: str | None = None
    request_id: str | None = None


_current: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "whisperr_request_scope", default=None
)


def current_scope() -> RequestScope | None:
    """The scope bound around this code, or None outside any request."""
    return _current.get()


@contextlib.contextmanager
def bind(user_id: str | None = None, *, request_id: str | None = None) -> Iterator[RequestScope]:
    """Bind a new scope for the code inside (a request, a task, a job); yields it."""
    scope = RequestScope(user_id, request_id)
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def bind_user(user_id: str | None) -> RequestScope:
    """Set the current request's user (an auth step that runs after the middleware).

    Inside a bound scope it changes that scope, for the whole request; outside one it binds a
    new scope for the rest of the current context, which a thread reused for later work (a
    WSGI worker thread without the middleware, a job loop) keeps: bind a scope around each
    unit of work there (:func:`bind`; the integrations do).
    """
    scope = _current.get()
    if scope is None:
        scope = RequestScope(user_id)
        _current.set(scope)
    else:
        scope.user_id = user_id
    return scope


class _Tracking(Protocol):
    def track(
        self,
        external_user_id: str,
        event_type: str,
        properties: Mapping[str, Any] | None = ...,
        context: Mapping[str, Any] | None = ...,
        *,
        occurred_at: Any = ...,
        message_id: str | None = ...,
    ) -> str: ...

    def identify(
        self,
        external_user_id: str,
        traits: Mapping[str, Any] | None = ...,
        *,
        email: str | None = ...,
        phone: str | None = ...,
        push_token: str | None = ...,
        preferred_channel: str | None = ...,
        channels: Sequence[Mapping[str, Any]] | None = ...,
    ) -> None: ...

    def _drop_anonymous(self, event_type: object) -> None: ...


class UserTracker:
    """``track()`` and ``identify()`` for the user of one scope (``request.whisperr``).

    With nobody signed in (``user_id`` None) an event has no one to belong to: it is not sent,
    and is counted in ``stats().dropped_by_reason["anonymous"]`` and reported, never lost
    silently. The scope's ``request_id`` is added to each event's context as ``request_id``
    (a key of yours wins).
    """

    def __init__(self, client: _Tracking, scope: RequestScope | None) -> None:
        self.client = client
        self.scope = RequestScope() if scope is None else scope

    def __repr__(self) -> str:
        return f"<UserTracker user_id={self.user_id!r}>"

    @property
    def user_id(self) -> str | None:
        return self.scope.user_id

    def track(
        self,
        event_type: str,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        *,
        occurred_at: Any = None,
        message_id: str | None = None,
    ) -> str | None:
        """Track for the scope's user; the ``$message_id``, or None when nobody is signed in.

        Raises:
            InvalidEventError: as ``track()``.
        """
        user_id = self.scope.user_id
        if not user_id:
            self.client._drop_anonymous(event_type)
            return None
        request_id = self.scope.request_id
        if request_id is not None:
            context = {"request_id": request_id, **(context or {})}
        return self.client.track(
            user_id, event_type, properties, context, occurred_at=occurred_at, message_id=message_id
        )

    def identify(
        self,
        traits: Mapping[str, Any] | None = None,
        *,
        email: str | None = None,
        phone: str | None = None,
        push_token: str | None = None,
        preferred_channel: str | None = None,
        channels: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Identify the scope's user (nothing while nobody is signed in)."""
        if self.scope.user_id:
            self.client.identify(
                self.scope.user_id, traits, email=email, phone=phone, push_token=push_token,
                preferred_channel=preferred_channel, channels=channels,
            )  # fmt: skip
