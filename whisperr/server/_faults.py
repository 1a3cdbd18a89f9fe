"""Fault knobs for the local server: scripted and random outages, auth failures, poison events."""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, final

import attrs

FaultKind = Literal["status", "close", "lost_ack", "delay", "hang"]
EventPredicate = Callable[[Mapping[str, Any]], bool]

_BARE_KINDS: tuple[FaultKind, ...] = ("close", "lost_ack", "hang")


class DropConnection(Exception):
    """Raised by the app to make the bundled server close the socket without answering.

    ASGI has no way to say "hang up", so connection faults (`close`, `lost_ack`, `hang`)
    need the bundled server (`LocalServer`, `python -m whisperr.server`). Under
    `httpx.ASGITransport` this exception simply propagates to the caller.
    """


@final
@attrs.frozen
class Fault:
    """One way to misbehave for one request; build it with the named constructors.

    Attributes:
        kind: `status`, `close`, `lost_ack`, `delay` or `hang`.
        code: The HTTP status of a `status` fault.
        retry_after: The `Retry-After` header of a `status` fault, if any.
        seconds: How long a `delay` fault waits before answering normally.
    """

    kind: FaultKind
    code: int = 0
    retry_after: str | None = None
    seconds: float = 0.0

    @classmethod
    def status(cls, code: int, retry_after: str | int | None = None) -> Fault:
        """Answer with `code` (e.g. 429, 500, 503) and an optional `Retry-After` value."""
        if not 400 <= code <= 599:
            raise ValueError(f"a status fault needs a 4xx or 5xx code, got {code}")
        return cls(
            "status", code=code, retry_after=None if retry_after is None else str(retry_after)
        )

    @classmethod
    def close(cls) -> Fault:
        """Close the connection without answering and without storing anything."""
        return cls("close")

    @classmethod
    def lost_ack(cls) -> Fault:
        """Store the events, then close the connection without answering."""
        return cls("lost_ack")

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait `seconds`, then answer normally."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        return cls("delay", seconds=seconds)

    @classmethod
    def hang(cls) -> Fault:
        """Never answer; the connection closes once the client gives up."""
        return cls("hang")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse `503`, `429:2` (with Retry-After), `close`, `lost_ack`, `hang` or `delay:0.5`."""
        head, _, arg = text.strip().partition(":")
        bare = {kind: cls(kind) for kind in _BARE_KINDS}
        if head in bare and not arg:
            return bare[head]
        if head == "delay":
            return cls.delay(float(arg))
        if head.isdigit():
            return cls.status(int(head), arg or None)
        raise ValueError(f"unknown fault {text!r}")

    def __str__(self) -> str:
        if self.kind == "status":
            return f"{self.code}" + (
                f" (Retry-After: {self.retry_after})" if self.retry_after else ""
            )
        return f"delay {self.seconds:g}s" if self.kind == "delay" else self.kind


@final
@attrs.define(eq=False)
class Faults:
    """Decides, per ingest request, whether and how the server misbehaves.

    A scripted fault wins over the random mix; both apply to `/v1/*` and `/_lenient/*`, never
    to `/_local/*`. All methods are safe to call from another thread while the server runs.

    Attributes:
        max_body_bytes: Answer 413 to bodies larger than this many bytes (on the wire).
        poison: An event type, or a predicate; a batch holding a matching event gets a 400.
        reject: A predicate; matching events are counted as rejected and not stored.
        latency: Seconds to wait before answering every ingest request.
    """

    max_body_bytes: int | None = None
    poison: EventPredicate | str | None = None
    reject: EventPredicate | None = None
    latency: float = 0.0
    _script: deque[Fault | None] = attrs.field(factory=deque, init=False)
    _mix: tuple[tuple[Fault, float], ...] = attrs.field(default=(), init=False)
    _random: random.Random = attrs.field(factory=random.Random, init=False, repr=False)
    _auth_failures: int = attrs.field(default=0, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)

    def script(self, faults: Iterable[Fault | None]) -> None:
        """Replace the script: the next requests get these faults in order (None: no fault)."""
        with self._lock:
            self._script = deque(faults)

    def mix(self, weights: Mapping[Fault, float], *, seed: int | None = None) -> None:
        """Pick a fault at random per request with these probabilities (summing to at most 1)."""
        if any(p < 0 for p in weights.values()) or sum(weights.values()) > 1.0 + 1e-9:
            raise ValueError("fault probabilities must be >= 0 and sum to at most 1")
        with self._lock:
            self._mix = tuple(weights.items())
            self._random = random.Random(seed)

    def auth_fail_for(self, n_requests: int) -> None:
        """Answer 401 to the next `n_requests` ingest requests, then recover."""
        with self._lock:
            self._auth_failures = n_requests

    def clear(self) -> None:
        """Forget every fault and knob: the server behaves normally again."""
        with self._lock:
            self._script.clear()
            self._mix, self._auth_failures = (), 0
        self.max_body_bytes, self.poison, self.reject, self.latency = None, None, None, 0.0

    def next_fault(self) -> Fault | None:
        """Consume the fault for one request: the next scripted one, else a draw from the mix."""
        with self._lock:
            if self._script:
                return self._script.popleft()
            return self._draw()

    def take_auth_failure(self) -> bool:
        """Consume one forced auth failure, if any are left."""
        with self._lock:
            if self._auth_failures <= 0:
                return False
            self._auth_failures -= 1
            return True

    def is_poison(self, event: Mapping[str, Any]) -> bool:
        """Whether `event` poisons its whole batch."""
        if isinstance(self.poison, str):
            return event.get("event_type") == self.poison
        return self.poison is not None and self.poison(event)

    def is_rejected(self, event: Mapping[str, Any]) -> bool:
        """Whether `event` is counted as rejected instead of stored."""
        return self.reject is not None and self.reject(event)

    def _draw(self) -> Fault | None:
        if not self._mix:
            return None
        roll, total = self._random.random(), 0.0
        for fault, probability in self._mix:
            total += probability
            if roll < total:
                return fault
        return None


def parse_mix(text: str) -> dict[Fault, float]:
    """Parse a mix like `"503=0.2,429:1=0.1,close=0.1,lost_ack=0.1"` for `Faults.mix`."""
    weights: dict[Fault, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, probability = item.rpartition("=")
        if not sep:
            raise ValueError(f"expected FAULT=PROBABILITY, got {item!r}")
        weights[Fault.parse(name)] = float(probability)
    return weights
