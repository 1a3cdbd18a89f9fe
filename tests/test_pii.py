"""The PII guard finds email addresses and phone numbers in strings, and guard() drops or refuses
the fields that hold them."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from whisperr._errors import InvalidEventError
from whisperr._pii import EMAIL, MAX_DEPTH, MODES, PHONE, guard, looks_like

from .test_validation import Unreadable

EMAILS = [
    "jane@example.com",
    "jane.doe@example.co.uk",
    "jane+newsletter@example.com",
    "jane_doe-99@mail.eu.example.org",
    "JANE.DOE@EXAMPLE.COM",
    "o'brien@example.ie",
    "josé@example.es",
    "用户@例子.广告",
    "jane@bücher.de",
    "jane@xn--bcher-kva.de",
    "ivan@пример.рф",
    "jane@example.xn--p1ai",
    "mailto:jane@example.com",
    "<a href='mailto:jane@example.com?subject=hi'>",
    '"jane@example.com"',
    "(jane@example.com)",
    "<jane@example.com>",
    "mail jane.doe@example.co.uk pls",
    "contact: jane@example.com.",
    "reply to jane@example.com, or call",
    "1234@example.com",
    "a@b.co",
    "jane@2x.example.com",
]

PHONES = [
    # international, with + or 00
    "+14155552671",
    "+1 415 555 2671",
    "+1 (415) 555-2671",
    "+1(415)555-2671",
    "+1.415.555.2671",
    "+1-415-555-2671",
    "+44 (0)20 7946 0958",
    "+44 20 7946 0958",
    "+447700900123",
    "+44 7700 900123",
    "(+44) 20 7946 0958",
    "+49 151 12345678",
    "+49 (0)30 123456",
    "+91 98765 43210",
    "+33 6 12 34 56 78",
    "+33 (0)1 23 45 67 89",
    "+81-90-1234-5678",
    "+55 11 91234-5678",
    "+86 138 0013 8000",
    "+61 412 345 678",
    "+7 912 345-67-89",
    "+353 85 123 4567",
    "+500 12345",
    "tel:+14155552671",
    "0044 20 7946 0958",
    "0049 151 12345678",
    # national
    "(415) 555-2671",
    "(415)555-2671",
    "415-555-2671",
    "415.555.2671",
    "415 555 2671",
    "1-800-555-0199",
    "1 415 555 2671",
    "020 7946 0958",
    "07700 900123",
    "(020) 7946 0958",
    "0161 496 0000",
    "0151 12345678",
    "030 123456",
    "(030) 123456",
    "06 12 34 56 78",
    "01.23.45.67.89",
    "01-23-45-67-89",
    "098765 43210",
    "98765 43210",
    "090-1234-5678",
    "03-1234-5678",
    "(11) 91234-5678",
    "0412 345 678",
    "138 0013 8000",
    "138-0013-8000",
    # inside longer strings
    "call me at +44 20 7946 0958 tomorrow",
    "my number is 415-555-2671.",
    "phone: (415) 555-2671, ext. 12",
    "ring 06 12 34 56 78 avant 18h",
    "WhatsApp +91 98765 43210 pls",
    "+44 20 7946 0958 2026-12-01",
    "call +1 415 555 2671 or email",
    "Tel.: 030 123456",
    "1 (800) 555-0199",
    "415-555-2671x12",
    "+1 415 555 2671 ext. 12",
    "+49 30 1234567 / +49 30 7654321",
]

NOT_CONTACT = [
    # dates and times
    "2026-12-01",
    "2026-12-01T10:00:00Z",
    "2026-12-01T10:00:00.123456+01:00",
    "2026-12-01 10:00:00",
    "12/01/2026",
    "01.12.2026",
    "01-12-2026",
    "01 12 2026",
    "01.12.2026 10:30",
    "01.12.2026-05.12.2026",
    "10/12/2026 - 20/12/2026",
    "10:30:15",
    "Tue, 01 Dec 2026 10:00:00 GMT",
    "2026-12-01 10:00:00 +0000",
    # identifiers
    "550e8400-e29b-41d4-a716-446655440000",
    "12345678-1234-5678-1234-567812345678",
    "ord_1234567890",
    "cus_NffrFeUfNV2Hib",
    "in_1MtHbELkdIwHu7ixl4OzzPMv",
    "pi_3MtwBwLkdIwHu7ix28a3tqPa",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "d41d8cd98f00b204e9800998ecf8427e",
    "sk-proj-4f3a9b2c1d0e8f7a6b5c4d3e2f1a0b9c8d7e6f5a",
    "1.2.3",
    "10.0.19045.2364",
    "v2.14.1-rc.3",
    "192.168.100.200",
    "010.001.002.003",
    "10.0.0.1:8080",
    "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
    "fe80::1ff:fe23:4567:890a",
    "978-3-16-148410-0",
    "978-0-306-40615-7",
    "DE89 3704 0044 0532 0130 00",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0.0.0",
    "123-45-6789",
    # amounts and numbers
    "1,299.00",
    "1.299,00 €",
    "$12,345,678.90",
    "12345",
    "-1234.5678",
    "123456789012",
    "4155552671",
    "1733011200",
    "1733011200123",
    "00441234567890",
    "0000012345",
    "+1234",
    "+12.50",
    "1 299 000",
    "3.14159265358979",
    "12 345 678",
    "1 234 567 890",
    "51.5074, -0.1278",
    "+1234567890123456789",
    # with an @ and no address
    "@username",
    "user@",
    "@",
    "a@b",
    "jane@localhost",
    "a@b.c",
    "price @ 5.00",
    "x@1.2.3.4",
    "icon@2x.png",
    "hero@1.5x.jpg",
    "@scope/package@1.2.3",
    "python@3.11",
    "test@test",
    "x@y.z1",
    # card-like, postal codes
    "4242 4242 4242 4242",
    "4242-4242-4242-4242",
    "3782 822463 10005",
    "SW1A 1AA",
    "10115",
    "94103-1234",
    "75008 Paris",
    # text
    "",
    "pro",
    "checkout completed",
    "C++ 20",
    "1+1=2",
    "order 12 of 40, 3 items",
    "x" * 20_000,
]


@pytest.mark.parametrize("value", EMAILS)
def test_emails_trip(value: str) -> None:
    assert looks_like(value) == EMAIL


@pytest.mark.parametrize("value", PHONES)
def test_phone_numbers_trip(value: str) -> None:
    assert looks_like(value) == PHONE


@pytest.mark.parametrize("value", NOT_CONTACT)
def test_other_values_do_not_trip(value: str) -> None:
    assert looks_like(value) is None


def test_the_tables_are_large_enough() -> None:
    assert len(EMAILS) + len(PHONES) >= 40
    assert len(NOT_CONTACT) >= 40


def test_long_strings_are_scanned() -> None:
    filler = "lorem ipsum 12 dolor @ 3.5 " * 40_000  # about 1 MB, nothing that trips
    assert looks_like(filler) is None
    assert looks_like(filler + " jane@example.com") == EMAIL
    assert looks_like(filler + " +44 20 7946 0958") == PHONE


@pytest.mark.parametrize(
    "value",
    [
        "a@" * 100_000,
        "a@b." * 100_000,
        ("x@" + "a" * 63 + ".") * 2_000,
        "1 " * 100_000,
        "+1 " * 100_000,
        "00123456789 " * 20_000,
        "1-2." * 100_000,
    ],
)
def test_adversarial_strings_end(value: str) -> None:
    # The patterns are linear by construction (see the module docstring); this shows they end.
    looks_like(value)


def test_raise_names_the_nested_field_and_not_the_value() -> None:
    values = {"plan": "pro", "contact": {"note": "mail jane@example.com pls"}}
    with pytest.raises(InvalidEventError) as info:
        guard("properties", values, "raise")
    assert info.value.field == "properties.contact.note"
    assert "jane" not in str(info.value)
    assert str(info.value) == (
        'properties.contact.note: looks like an email address; with pii="raise" contact '
        "details go in identify()'s channels, not in properties"
    )


def test_raise_names_a_list_item_and_says_traits() -> None:
    values = {"numbers": ["n/a", ("x", "+44 20 7946 0958")]}
    with pytest.raises(InvalidEventError) as info:
        guard("traits", values, "raise")
    assert info.value.field == "traits.numbers[1][1]"
    assert info.value.rule.startswith("looks like a phone number;")
    assert info.value.rule.endswith("not in traits")
    assert "7946" not in str(info.value)


def test_raise_stops_at_the_first_field() -> None:
    with pytest.raises(InvalidEventError) as info:
        guard("properties", {"a": "ok", "b": "+14155552671", "c": "jane@example.com"}, "raise")
    assert info.value.field == "properties.b"


def test_drop_fields_removes_exactly_the_tripping_fields() -> None:
    shared = {"x": 1}
    values: dict[str, Any] = {
        "plan": "pro",
        "email": "jane@example.com",
        "amount": 4155552671,  # a number is never a phone number
        "contact": {"note": "call 415-555-2671", "ok": "fine", "deep": {"tel": "+14155552671"}},
        "emails": ["n/a", "jane@example.com", "x", "bob@example.org"],
        "pair": ("keep", "+44 20 7946 0958"),
        "shared": shared,
        "rows": [{"a": "1"}, {"phone": "020 7946 0958", "b": 2}],
    }
    kept, removed = guard("properties", values, "drop_fields")
    assert kept == {
        "plan": "pro",
        "amount": 4155552671,
        "contact": {"ok": "fine", "deep": {}},
        "emails": ["n/a", "x"],
        "pair": ("keep",),
        "shared": {"x": 1},
        "rows": [{"a": "1"}, {"b": 2}],
    }
    assert removed == [
        "properties.email",
        "properties.contact.note",
        "properties.contact.deep.tel",
        "properties.emails[1]",
        "properties.emails[3]",
        "properties.pair[1]",
        "properties.rows[1].phone",
    ]
    assert type(kept["pair"]) is tuple
    assert kept["shared"] is shared  # untouched containers are shared, not copied
    assert kept["rows"][0] is values["rows"][0]


def test_drop_fields_copies_a_mapping_of_another_type_to_a_dict() -> None:
    values = types.MappingProxyType({"a": "jane@example.com", "b": "ok"})
    kept, removed = guard("traits", values, "drop_fields")
    assert kept == {"b": "ok"}
    assert removed == ["traits.a"]


def test_a_shared_container_is_dropped_at_each_path() -> None:
    inner = {"tel": "+14155552671", "ok": 1}
    kept, removed = guard("properties", {"a": inner, "b": [inner]}, "drop_fields")
    assert kept == {"a": {"ok": 1}, "b": [{"ok": 1}]}
    assert removed == ["properties.a.tel", "properties.b[0].tel"]
    assert inner == {"tel": "+14155552671", "ok": 1}


@pytest.mark.parametrize("mode", MODES)
def test_nothing_trips_returns_the_same_object(mode: Any) -> None:
    values = {"plan": "pro", "n": 12, "when": "2026-12-01", "tags": ["a", {"b": "c"}], "x": None}
    kept, removed = guard("properties", values, mode)
    assert kept is values
    assert removed == []
    empty: Mapping[str, Any] = {}
    assert guard("traits", empty, mode) == (empty, [])


@pytest.mark.parametrize("mode", MODES)
def test_the_input_is_never_mutated(mode: Any) -> None:
    nested = {"tel": "+14155552671", "keep": "ok"}
    items = ["ok", "jane@example.com"]
    values: dict[str, Any] = {"email": "jane@example.com", "nested": nested, "list": items}
    with contextlib.suppress(InvalidEventError):
        guard("properties", values, mode)
    assert values == {
        "email": "jane@example.com",
        "nested": {"tel": "+14155552671", "keep": "ok"},
        "list": ["ok", "jane@example.com"],
    }
    assert values["nested"] is nested
    assert values["list"] is items


def test_keys_are_not_examined() -> None:
    values = {"jane@example.com": "ok", "+14155552671": 1}
    assert guard("properties", values, "raise") == (values, [])


def test_only_strings_are_examined() -> None:
    values = {"n": 4155552671, "f": 14155552671.0, "b": b"jane@example.com", "s": {1, 2}}
    assert guard("properties", values, "raise") == (values, [])


@pytest.mark.parametrize("mode", MODES)
def test_a_self_referencing_dict_does_not_recurse_forever(mode: Any) -> None:
    values: dict[str, Any] = {"plan": "pro"}
    values["self"] = values
    values["again"] = [values, values]
    kept, removed = guard("properties", values, mode)
    assert kept is values
    assert removed == []


def test_a_self_referencing_dict_with_pii_is_dropped_where_scanned() -> None:
    values: dict[str, Any] = {"email": "jane@example.com"}
    values["self"] = values
    kept, removed = guard("properties", values, "drop_fields")
    assert removed == ["properties.email"]
    assert kept["self"] is values  # the cycle is not followed; the encoding refuses it later


def test_containers_deeper_than_the_bound_are_not_scanned() -> None:
    def nest(levels: int) -> dict[str, Any]:
        values: dict[str, Any] = {"email": "jane@example.com"}
        for _ in range(levels - 1):
            values = {"in": values}
        return values

    at_bound = nest(MAX_DEPTH)
    _, removed = guard("properties", at_bound, "drop_fields")
    assert removed == ["properties" + ".in" * (MAX_DEPTH - 1) + ".email"]
    too_deep = nest(MAX_DEPTH + 1)
    assert guard("properties", too_deep, "raise") == (too_deep, [])
    very_deep = nest(100_000)
    assert guard("properties", very_deep, "raise") == (very_deep, [])


def test_a_wide_shared_structure_is_walked_once() -> None:
    level: Any = {"ok": "fine"}
    for _ in range(MAX_DEPTH - 1):
        level = {"a": level, "b": level, "c": [level, level]}  # 4**31 paths, 32 containers
    assert guard("properties", level, "raise") == (level, [])


@pytest.mark.parametrize("mode", MODES)
def test_a_mapping_that_fails_to_be_read_is_left_to_validation(mode: Any) -> None:
    unreadable = Unreadable()
    assert guard("properties", unreadable, mode) == (unreadable, [])
    values = {"a": unreadable, "b": "ok"}
    assert guard("properties", values, mode) == (values, [])


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        guard("properties", {}, "drop")  # type: ignore[arg-type]


class FreshValues(Mapping[str, Any]):
    """A mapping that makes a new list at each read (as row views and lazy adapters do): the
    lists of earlier reads are freed, and a later one may get their address."""

    def __init__(self, data: dict[str, list[str]]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> list[str]:
        return [*self._data[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_values_made_at_each_read_are_each_scanned() -> None:
    row = FreshValues({"a": ["nothing here"], "b": ["still nothing"], "c": ["mail jo@example.com"]})
    with pytest.raises(InvalidEventError) as raised:
        guard("properties", row, "raise")
    assert raised.value.field == "properties.c[0]"
    row = FreshValues({"a": ["jo@example.com", "A"], "b": ["x"], "c": ["bo@example.org", "C"]})
    kept, removed = guard("properties", row, "drop_fields")
    assert kept == {"a": ["A"], "b": ["x"], "c": ["C"]}
    assert removed == ["properties.a[0]", "properties.c[0]"]
