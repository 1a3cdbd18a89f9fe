"""Capture-time helpers under hostile input and concurrent use (whisperr._events, directly).

Bad input of any kind raises InvalidEventError naming the field, never another exception; a
value that passes a check is the value that reaches the wire; message ids never run out.
"""

from __future__ import annotations

import collections
import enum
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any

import orjson
import pytest

from whisperr import InvalidEventError, _events

UTC = timezone.utc
NOW = 1_781_438_400.0  # 2026-06-14T12:00:00Z, a whole second so window edges are exact floats
NOW_DT = datetime.fromtimestamp(NOW, UTC)
BASE = {"sdk_name": "whisperr-python", "sdk_version": "0"}
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# --- message ids --------------------------------------------------------------------------------


class DrainedOnRefill(list[str]):
    """A ready_ids list that another thread empties right after each refill lands in it."""

    def extend(self, ids: Any) -> None:
        super().extend(ids)
        self.clear()  # every id just added is popped by other threads before this one's turn


def test_a_refill_drained_by_other_threads_still_gives_this_caller_an_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_events, "ready_ids", DrainedOnRefill())
    first, second = _events.new_message_id(), _events.new_message_id()
    assert UUID4.fullmatch(first)
    assert UUID4.fullmatch(second)
    assert first != second


def test_message_ids_from_many_threads_never_fail_and_never_repeat() -> None:
    """Threads switched every microsecond take ids while the shared list keeps running dry."""
    ready = _events.ready_ids
    threads, calls = 16, 3000
    start = threading.Barrier(threads)
    results: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def work(out: list[str]) -> None:
        take = _events.new_message_id
        try:
            start.wait()
            for _ in range(calls):
                out.append(take())
        except BaseException as exc:  # reported below: a thread's exception must fail the test
            errors.append(exc)

    interval = sys.getswitchinterval()
    ready.clear()  # start empty: every 256 calls somebody refills
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=work, args=(out,)) for out in results]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    ids = [mid for out in results for mid in out]
    assert len(ids) == threads * calls
    assert len(set(ids)) == len(ids)
    assert _events.ready_ids is ready  # never rebound: the client holds ready_ids.pop


def test_message_ids_are_random_uuid4() -> None:
    for _ in range(600):  # across more than one refill
        mid = _events.new_message_id()
        assert UUID4.fullmatch(mid)
        parsed = uuid.UUID(mid)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


# --- mappings that fail while they are read ----------------------------------------------------


class Failing(Mapping[str, Any]):
    """A mapping whose ``method`` raises ``error``."""

    def __init__(self, method: str, error: BaseException) -> None:
        self.method, self.error = method, error

    def _maybe_fail(self, method: str) -> None:
        if method == self.method:
            raise self.error

    def __getitem__(self, key: str) -> Any:
        self._maybe_fail("__getitem__")
        return 1

    def __iter__(self) -> Iterator[str]:
        self._maybe_fail("__iter__")
        return iter(["a", "b"])

    def __len__(self) -> int:
        self._maybe_fail("__len__")
        return 2

    def keys(self) -> Any:
        self._maybe_fail("keys")
        return super().keys()


FAILURES: list[BaseException] = [
    ZeroDivisionError("boom"),
    KeyError("a"),
    RuntimeError("dictionary changed size during iteration"),
    TypeError("nope"),
    RecursionError(),
]


class RaceDict(collections.UserDict[str, Any]):
    """A UserDict that another thread adds a key to while its keys are being read."""

    def __iter__(self) -> Iterator[str]:
        for key in self.data:  # what UserDict.__iter__ does, with the other thread's write
            self.data[f"added_{len(self.data)}"] = 1  # landing between two steps
            yield key


class LyingClass:
    """Claims to be a dict (and so a Mapping, and a str below) without being one."""

    __class__ = property(lambda self: dict)  # type: ignore[assignment]


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise ValueError("no message either")


def bad_mappings() -> list[tuple[str, Callable[[], object]]]:
    cases: list[tuple[str, Callable[[], object]]] = [
        (f"{method}-{type(error).__name__}", lambda m=method, e=error: Failing(m, e))
        for method in ("__getitem__", "__iter__", "keys")
        for error in FAILURES
    ]
    cases.append(("userdict-mutated-while-copied", lambda: RaceDict(a=1, b=2)))
    cases.append(("lying-class", LyingClass))
    cases.append(("unprintable-error", lambda: Failing("__getitem__", UnprintableError())))
    return cases


MAPPING_READERS: dict[str, Callable[[object], object]] = {
    "properties": lambda value: _events.encode_object("properties", value),
    "context": lambda value: _events.encode_context(value, BASE),
    "traits": lambda value: _events.encode_identify("u", value, None, None, ()),
}


@pytest.mark.parametrize(("name", "make"), bad_mappings(), ids=[n for n, _ in bad_mappings()])
@pytest.mark.parametrize("field", list(MAPPING_READERS))
def test_a_mapping_that_fails_while_read_is_invalid_input(
    name: str, make: Callable[[], object], field: str
) -> None:
    value = make()
    with pytest.raises(InvalidEventError) as info:
        MAPPING_READERS[field](value)
    assert info.value.field == field
    assert info.value.__cause__ is None


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)])
def test_an_interrupt_while_reading_a_mapping_is_not_swallowed(error: BaseException) -> None:
    with pytest.raises(type(error)):
        _events.encode_object("properties", Failing("__getitem__", error))
    with pytest.raises(type(error)):
        _events.encode_context(Failing("keys", error), BASE)
    with pytest.raises(type(error)):
        _events.encode_identify("u", None, None, [Failing("__iter__", error)], ())


class CollidingKey:
    """A key with the hash of "$message_id" whose comparison raises."""

    def __hash__(self) -> int:
        return hash("$message_id")

    def __eq__(self, other: object) -> bool:
        raise ZeroDivisionError("compare")


def test_a_context_key_that_fails_to_compare_is_invalid_input() -> None:
    with pytest.raises(InvalidEventError) as info:
        _events.encode_context({CollidingKey(): 1}, BASE)
    assert info.value.field == "context"


def test_a_good_mapping_still_encodes_as_before() -> None:
    assert _events.encode_object("properties", collections.OrderedDict(a=1)) == b'{"a":1}'
    encoded, mid = _events.encode_context(collections.UserDict({"$message_id": "m", "k": 1}), BASE)
    assert orjson.loads(encoded) == {**BASE, "k": 1}
    assert mid == "m"


# --- identify ----------------------------------------------------------------------------------


class FailingSequence(Sequence[object]):
    def __init__(self, error: Exception | None, length: int = 3) -> None:
        self.error, self.length, self.reads = error, length, 0

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int) and index >= self.length:
            raise IndexError(index)
        self.reads += 1
        if self.error is not None and self.reads > 1:
            raise self.error
        return {"channel": "email", "address": f"a{index}@example.com"}

    def __len__(self) -> int:
        return self.length


class FakeBool:
    __class__ = property(lambda self: bool)  # type: ignore[assignment]


class Channel(str, enum.Enum):
    EMAIL = "email"


INVALID_IDENTIFIES: list[tuple[dict[str, Any], str, str]] = [
    ({"channels": FailingSequence(ValueError("x"))}, "channels", "could not be read"),
    ({"channels": FailingSequence(RuntimeError("x"))}, "channels", "could not be read"),
    ({"channels": [Failing("__getitem__", KeyError("channel"))]}, "channels[0]", "mapping"),
    ({"channels": [RaceDict(channel="sms", address="+1")]}, "channels[0]", "mapping"),
    ({"channels": [LyingClass()]}, "channels[0]", "mapping"),
    ({"preferred_channel": ["email"]}, "preferred_channel", "email, sms, push"),
    ({"preferred_channel": {"email": 1}}, "preferred_channel", "email, sms, push"),
    ({"email": "ada_\ud800@example.com"}, "channels[0].address", "lone surrogates"),
    (
        {"channels": [{"channel": "email", "address": "a@b.c", "opted_in": FakeBool()}]},
        "channels[0].opted_in",
        "bool",
    ),
    ({"channels": [{"channel": ["email"], "address": "a@b.c"}]}, "channels[0].channel", "email"),
    ({"channels": [{CollidingKey(): 1}]}, "channels[0]", "unknown keys"),
]


@pytest.mark.parametrize(("args", "field", "rule"), INVALID_IDENTIFIES)
def test_an_identify_that_fails_while_read_is_invalid_input(
    args: dict[str, Any], field: str, rule: str
) -> None:
    shortcuts = (("email", args.pop("email", None)),)
    with pytest.raises(InvalidEventError, match=rule) as info:
        _events.encode_identify(
            "u", None, args.get("preferred_channel"), args.get("channels"), shortcuts
        )
    assert info.value.field == field


def test_a_huge_channel_list_is_read_only_as_far_as_the_limit() -> None:
    channels = FailingSequence(None, length=1_000_000)
    with pytest.raises(InvalidEventError, match="at most 10") as info:
        _events.encode_identify("u", None, None, channels, ())
    assert info.value.field == "channels"
    assert channels.reads == _events.MAX_CHANNELS + 1


def test_identify_keeps_exact_strings_from_str_enums() -> None:
    body = _events.encode_identify(
        "u",
        None,
        Channel.EMAIL,
        [{"channel": Channel.EMAIL, "address": "a@b.c"}],
        (),
    )
    assert orjson.loads(body) == {
        "external_user_id": "u",
        "preferred_channel": "email",
        "channels": [{"channel": "email", "address": "a@b.c", "opted_in": True}],
    }


def test_unknown_channel_keys_are_listed_as_before() -> None:
    with pytest.raises(InvalidEventError, match=re.escape("has unknown keys ['kind']")):
        _events.encode_identify("u", None, None, [{"channel": "sms", "kind": "x"}], ())


# --- occurred_at ---------------------------------------------------------------------------------


class RaisingZone(tzinfo):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def utcoffset(self, dt: datetime | None) -> timedelta:
        raise self.error


class OffsetZone(tzinfo):
    def __init__(self, offset: object) -> None:
        self.offset = offset

    def utcoffset(self, dt: datetime | None) -> Any:
        return self.offset


class Stamped(datetime):
    """A datetime subclass whose timestamp() is its own (pendulum, pandas.Timestamp...)."""

    result: Any = None

    def timestamp(self) -> Any:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def stamped(result: object) -> Stamped:
    value = Stamped(2026, 6, 14, 12, tzinfo=UTC)
    value.result = result
    return value


class LyingStr:
    __class__ = property(lambda self: str)  # type: ignore[assignment]


BAD_STAMPS: list[tuple[object, str]] = [
    (datetime(2026, 6, 14, 12, tzinfo=RaisingZone(ZeroDivisionError("tz"))), "could not be read"),
    (datetime(2026, 6, 14, 12, tzinfo=RaisingZone(KeyError("tz"))), "could not be read"),
    (datetime(2026, 6, 14, 12, tzinfo=OffsetZone(timedelta(hours=30))), "could not be read"),
    (datetime(2026, 6, 14, 12, tzinfo=OffsetZone(5)), "could not be read"),
    (stamped(OverflowError("year 10000 is out of range")), "could not be read"),
    (stamped(ValueError("year out of range")), "could not be read"),
    (stamped(OSError(75, "Value too large")), "could not be read"),
    (stamped("soon"), "could not be read"),
    (stamped(float("nan")), "not a real date"),
    (stamped(float("inf")), "not a real date"),
    (LyingStr(), "aware datetime"),
    ("0001-01-01T00:00:00+01:00", "30 days"),
    ("9999-12-31T23:59:59-01:00", "future"),
    ("2026-06-14T12:00:00" + "0" * 100_000 + "Z", "RFC 3339"),
]


@pytest.mark.parametrize(("value", "rule"), BAD_STAMPS, ids=[r for _, r in BAD_STAMPS])
def test_an_occurred_at_that_cannot_be_read_is_invalid_input(value: object, rule: str) -> None:
    with pytest.raises(InvalidEventError, match=rule) as info:
        _events.parse_occurred_at(value, NOW)
    assert info.value.field == "occurred_at"
    assert len(str(info.value)) < 300  # a huge input is not echoed whole


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(2)])
def test_an_interrupt_while_reading_occurred_at_is_not_swallowed(error: BaseException) -> None:
    with pytest.raises(type(error)):
        _events.parse_occurred_at(datetime(2026, 6, 14, 12, tzinfo=RaisingZone(error)), NOW)
    with pytest.raises(type(error)):
        _events.parse_occurred_at(stamped(error), NOW)


def test_a_subclass_timestamp_is_the_stamp_kept() -> None:
    assert _events.parse_occurred_at(stamped(NOW - 1), NOW) == NOW - 1
    assert type(_events.parse_occurred_at(stamped(int(NOW)), NOW)) is float


def test_the_future_side_keeps_a_minute_of_margin() -> None:
    assert _events.FUTURE_MARGIN == 60.0
    limit = _events.MAX_FUTURE - _events.FUTURE_MARGIN
    assert limit == 240.0
    assert _events.parse_occurred_at(NOW_DT + timedelta(seconds=240), NOW) == NOW + 240
    assert _events.parse_occurred_at(f"{_events.format_timestamp(NOW + 240)}", NOW) == NOW + 240
    for late in (timedelta(seconds=240, milliseconds=1), timedelta(minutes=5)):
        with pytest.raises(InvalidEventError, match="more than 4 minutes in the future"):
            _events.parse_occurred_at(NOW_DT + late, NOW)


def test_the_past_side_is_unchanged() -> None:
    assert _events.parse_occurred_at(NOW_DT - timedelta(days=30), NOW) == NOW - _events.MAX_PAST
    with pytest.raises(InvalidEventError, match="30 days in the past"):
        _events.parse_occurred_at(NOW_DT - timedelta(days=30, milliseconds=1), NOW)


# --- event_type and other strings ----------------------------------------------------------------


class Kind(str, enum.Enum):  # enum.StrEnum from Python 3.11 behaves the same here
    PAYMENT_FAILED = "payment_failed"


class Smuggler(str):
    """Valid characters, but every method that could be asked about them lies."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("payment_failed")

    def __str__(self) -> str:
        return "payment_failed"

    def __len__(self) -> int:
        return 1

    def strip(self, chars: str | None = None) -> str:
        return str(self)

    def isascii(self) -> bool:
        return True

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b'x","external_user_id":"someone_else'


def test_a_str_enum_event_type_is_returned_as_an_exact_str() -> None:
    checked = _events.check_event_type(Kind.PAYMENT_FAILED)
    assert type(checked) is str
    assert checked == "payment_failed"


def test_a_str_subclass_cannot_smuggle_characters_onto_the_wire() -> None:
    checked = _events.check_event_type(Smuggler("payment_failed"))
    assert type(checked) is str
    item: _events.Item = ("u", checked, NOW, b"{}", "m")
    event = orjson.loads(_events.encode_event(item, b"}"))
    assert (event["event_type"], event["external_user_id"]) == ("payment_failed", "u")
    with pytest.raises(InvalidEventError, match="snake_case"):
        _events.check_event_type(Smuggler("Payment Failed"))


def test_strings_that_pass_a_check_come_back_exact() -> None:
    for check in (_events.check_user_id, _events.check_message_id):
        value = check(Smuggler("abc"))
        assert (type(value), value) == (str, "abc")
    with pytest.raises(InvalidEventError, match="outer spaces"):
        _events.check_message_id(Smuggler(" padded "))
    with pytest.raises(InvalidEventError, match="at most 200"):
        _events.check_message_id(Smuggler("x" * 201))
    with pytest.raises(InvalidEventError, match="at most 1000"):
        _events.check_user_id(Smuggler("x" * 1001))
    with pytest.raises(InvalidEventError, match="lone surrogates"):
        _events.check_user_id(Smuggler("\ud800"))


def test_event_type_is_at_most_255_characters() -> None:
    assert _events.MAX_EVENT_TYPE == 255
    assert _events.check_event_type("a" * 255) == "a" * 255
    for value in ("a" * 256, "a_" * 500_000 + "a", Kind.PAYMENT_FAILED.value * 20):
        with pytest.raises(InvalidEventError, match="must be at most 255 characters") as info:
            _events.check_event_type(value)
        assert info.value.field == "event_type"
        assert len(str(info.value)) < 100


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    ("check", "field"),
    [
        (_events.check_user_id, "external_user_id"),
        (_events.check_event_type, "event_type"),
        (_events.check_message_id, "message_id"),
        (lambda v: _events.parse_occurred_at(v, NOW), "occurred_at"),
        (lambda v: _events.encode_identify("u", None, v, None, ()), "preferred_channel"),
        (lambda v: _events.encode_identify("u", None, None, None, (("email", v),)), "address"),
    ],
)
@pytest.mark.parametrize(
    "value", [Unprintable(), LyingStr(), b"x" * 1_000_000], ids=["unprintable", "lying", "huge"]
)
def test_a_value_that_cannot_be_shown_is_still_reported(
    check: Callable[[object], object], field: str, value: object
) -> None:
    with pytest.raises(InvalidEventError) as info:
        check(value)
    assert info.value.field.endswith(field)
    assert len(str(info.value)) < 300


# --- the batch answer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "count"),
    [
        (b'{"accepted":3,"rejected":2}', 2),
        (b'{"rejected":1}', 1),
        (b'{"rejected":true}', 0),
        (b'{"rejected":false}', 0),
        (b'{"rejected":0}', 0),
        (b'{"rejected":-1}', 0),
        (b'{"rejected":1.5}', 0),
        (b'{"rejected":"2"}', 0),
        (b'{"rejected":null}', 0),
        (b'{"rejected":[1]}', 0),
        (b"[1]", 0),
        (b"", 0),
        (b"not json", 0),
    ],
)
def test_only_a_real_positive_int_counts_as_rejected(content: bytes, count: int) -> None:
    assert _events.rejected_count(content) == count
