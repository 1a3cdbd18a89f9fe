"""The PII guard: email addresses and phone numbers found in event properties and identify traits.

Opt-in (``pii="raise"`` or ``pii="drop_fields"``). Whisperr's integration guidance keeps
contact details out of properties and traits: they go in identify()'s contact channels, which
stay allowed and which this module never sees. :func:`guard` walks the values (nested mappings,
lists and tuples) and looks at every string, finding a detail anywhere in it ("mail
jane@example.com pls" trips). Strings only: a number is never taken for a phone number, and
keys are not looked at.

Detection is a heuristic: it catches the common forms, not every form, and a few things that
only look like one.

Emails: a character of a local part, ``@``, dotted labels and a top-level domain of two or more
letters (or a punycode ``xn--`` one). Plus-tags, subdomains, upper case, unicode and
``mailto:`` are caught. Missed: quoted local parts (``"jane doe"@example.com``), addresses at an
IP (``jane@[10.0.0.1]``) or an undotted host (``jane@localhost``), obfuscations (``jane at
example dot com``). Caught though no mailbox: the same shape elsewhere, as in
``git@github.com:org/repo`` or ``https://user:pass@example.com``. ``@handle``, ``price @ 5.00``,
``a@b`` and ``icon@2x.png`` do not trip.

Phone numbers, ASCII digits only, in groups split by a space, ``-`` or ``.``:

- international, 8 to 15 digits with the country code (E.164's bound): ``+`` (or ``(+44)``)
  then digits, grouped or not (``+14155552671``, ``+44 (0)20 7946 0958``); ``00`` then a
  country code and at least one more group (``0044 20 7946 0958``). When the groups run past
  15 digits, those that fit count (a number followed by other figures).
- national, 9 to 12 digits: a trunk ``0`` then one to four more groups, one separator
  throughout (``020 7946 0958``, ``0151 12345678``, ``030 123456``, ``06 12 34 56 78``,
  ``01.23.45.67.89``, ``098765 43210``, ``090-1234-5678``); a parenthesised area code
  (``(415) 555-2671``, ``(11) 91234-5678``); and three shapes without a trunk ``0``: 3-3-4
  (``415-555-2671``, ``415.555.2671``, ``1-800-555-0199``), 3-4-4 for Chinese mobiles
  (``138 0013 8000``) and 5-5 for Indian ones (``98765 43210``).

Missed on purpose: a bare run of digits (``4155552671``; order numbers, timestamps and card-like
ids look the same), local numbers of 7 or 8 digits (``555-2671``), other national shapes, other
scripts' digits, and vanity numbers. Digits inside a word (ids, hashes, UUIDs) and groups inside
a longer run of groups (``4242 4242 4242 4242``, IPv4 addresses, versions) do not trip, nor do
dates (``01.12.2026`` has 8 digits), times, amounts (a comma is no separator), ZIP+4 and postal
codes. Some things of a phone's shape trip: grouped figures such as ``+12 345 678`` or
``0612 3456 78``, a zero-padded order number ``0012-3456-7890``, some IBANs' tails.

Strings of any length are scanned in linear time: no pattern has a repetition that can match
the same text in two ways, and each repetition is bounded or ends at a character its class
cannot match (see the comments at the patterns). Containers nested more than 32 deep are left
as they are, not scanned; so are a container met again inside itself (a cycle: the encoding
refuses it after the guard) and a mapping that fails to be read (validation reports it). A
container shared by several fields is walked once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from ._errors import InvalidEventError

Mode = Literal["raise", "drop_fields"]
MODES: tuple[str, ...] = ("raise", "drop_fields")

EMAIL = "an email address"
PHONE = "a phone number"
MAX_DEPTH = 32  # the values are level 1; containers deeper than this are not scanned

# The last character of a local part, the @, dotted labels, a top-level domain of letters. Each
# label ends at a dot its class cannot match, and the lookahead after the @ skips "icon@2x.png".
_EMAIL = re.compile(
    r"[\w.!#$%&'*+/=?^`{|}~-]@(?![0-9]{1,3}(?:\.[0-9]{1,2})?x\.[^\W\d_]{2,5}(?!\.?[\w-]))"
    r"(?:[\w-]{1,63}\.){1,8}(?:[^\W\d_]{2,63}|[Xx][Nn]--[A-Za-z0-9-]{1,59})(?![\w-])"
)

# A group of digits is always followed by a separator before the next group, so a run of groups
# splits one way only. The lookbehinds keep a match from starting inside a word or, for the
# national forms, in the middle of a longer sequence of groups (a card number, an IPv4 address,
# a version, a date); the first lookahead skips, in a few steps, what has too few digits.
_GROUP = r"(?:[ .-]|[ ]?\([0-9]{1,4}\)[ ]?)[0-9]{1,15}"  # "+1 (415) 555", "+44 (0)20"
_PHONE = re.compile(
    rf"""
    (?<![\w+])
    (?=\(?\+?(?:[ .()-]{{0,2}}[0-9]){{8}})
    (?:
        (?P<plus>(?:\(\+[1-9][0-9]{{0,2}}\)|\+[1-9][0-9]{{0,14}})(?:{_GROUP}){{0,7}})
        | (?<![0-9][ .,/:-])
        (?:
            (?P<zeros>00[1-9][0-9]{{0,14}}(?:{_GROUP}){{1,7}})
            | (?P<paren>(?:1[ ]?)?\([0-9]{{2,5}}\)[ ]?[0-9]{{2,8}}(?:[ .-][0-9]{{2,8}}){{0,3}})
            | (?P<trunk>0[1-9][0-9]{{0,4}}(?P<sep>[ .-])[0-9]{{2,8}}(?:(?P=sep)[0-9]{{2,8}}){{0,3}})
            | (?P<shape>
                (?:1[ .-])?[0-9]{{3}}[ .-][0-9]{{3}}[ .-][0-9]{{4}}
                | 1[3-9][0-9](?P<cn>[ -])[0-9]{{4}}(?P=cn)[0-9]{{4}}
                | [6-9][0-9]{{4}}[ ][0-9]{{5}}
            )
        )
    )
    (?!(?!x[0-9])\w)(?![.,/:-][0-9])  # not followed by more, but an extension may
    """,
    re.VERBOSE,
)
_DIGITS = re.compile(r"[0-9]+")
# At least 8 ASCII digits (the fewest any phone form has). A search that fails from one digit
# fails from every later one, so it scans the string at most 8 times.
_EIGHT_DIGITS = re.compile(r"[0-9](?:[^0-9]*[0-9]){7}")
_MIN_PHONE_CHARS = 9  # "+" and 8 digits


def looks_like(value: str) -> str | None:
    """What kind of contact detail `value` contains ("an email address" or "a phone number"),
    or None."""
    if "@" in value and _EMAIL.search(value) is not None:
        return EMAIL
    if len(value) < _MIN_PHONE_CHARS or _EIGHT_DIGITS.search(value) is None:
        return None
    match = _PHONE.search(value)
    while match is not None:
        if _is_phone(match):
            return PHONE
        match = _PHONE.search(value, match.end())  # lookbehinds still see what is before
    return None


def _is_phone(match: re.Match[str]) -> bool:
    """Whether a match of the phone pattern has a phone's count of digits."""
    text = match.group()
    if match.group("shape") is not None:
        return True  # fixed group sizes
    international = match.group("plus") is not None or match.group("zeros") is not None
    if international:
        if text.startswith("00"):
            text = text[2:]
        groups = [len(g) for g in _DIGITS.findall(text.replace("(0)", "", 1))]
        low, high = 8, 15
    else:
        groups = [len(g) for g in _DIGITS.findall(text)]
        if match.group("sep") == "." and len(groups) == 4 and max(groups) <= 3:
            return False  # an IPv4 address written with leading zeros: 010.001.002.003
        low, high = 9, 12
    total = sum(groups)
    # A number followed by other figures ("+44 20 7946 0958 2026"): drop trailing groups.
    while total > high and len(groups) > 2:
        total -= groups.pop()
    return low <= total <= high


def guard(where: str, values: Mapping[str, Any], mode: Mode) -> tuple[Mapping[str, Any], list[str]]:
    """Look for contact details in `values` (the ``where`` field: "properties" or "traits").

    Returns `values` itself and an empty list when nothing looks like an email address or a
    phone number. Otherwise, with ``"drop_fields"``, returns a copy without each such string
    (a key removed from its mapping, an item from its list or tuple) and the paths of the
    removed fields (``properties.contact.note``, ``properties.emails[1]``, indexes as in
    `values`); only the containers on the way to a removed string are copied (mappings become
    dicts), the others are shared. `values` is never changed.

    Raises:
        InvalidEventError: with ``"raise"``, at the first string that trips; the message names
            the field and the kind of detail, never the value.
        ValueError: `mode` is not one of :data:`MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'raise' or 'drop_fields', got {mode!r:.200}")
    raising = mode == "raise"
    found = _mapping(values, 1, raising, {id(values): (values, _BUSY)})
    if found is None:
        return values, []
    kept, paths, kind = found
    if raising:
        raise InvalidEventError(
            where + paths[0],
            f'looks like {kind}; with pii="raise" contact details go in identify()\'s '
            f"channels, not in {where}",
        )
    return kept, [where + path for path in paths]


# What a container's walk found: None when nothing tripped, else its copy without the tripping
# strings (None when raising), their paths relative to it (".key", "[1]"), the first one's kind.
_Found = tuple[Any, list[str], str] | None
# Memo of one walk: id of a container walked, or being walked, -> the container and what its
# walk found; so a container shared by many fields is walked once, and one met inside itself
# is not followed. The container is kept with its id: a mapping that makes its values on each
# read would otherwise free them, and a later value could get a freed one's id.
_Memo = dict[int, tuple[Any, Any]]
_BUSY: Any = object()
# Types whose values are skipped at once, not run through isinstance() against an ABC.
_SCALARS = frozenset({int, float, bool, type(None)})
_CONTAINERS = (Mapping, list, tuple)


def _mapping(obj: Mapping[Any, Any], depth: int, raising: bool, memo: _Memo) -> _Found:
    try:
        return _read_mapping(obj, depth, raising, memo)
    except Exception:  # reading runs the caller's code; validation reports what it raises
        return None


def _read_mapping(obj: Mapping[Any, Any], depth: int, raising: bool, memo: _Memo) -> _Found:
    copy: dict[Any, Any] | None = None
    paths: list[str] = []
    first = ""
    for key, value in obj.items():
        cls = type(value)
        if cls in _SCALARS:
            continue
        if cls is str or isinstance(value, str):
            kind = looks_like(value)
            if kind is None:
                continue
            first = first or kind
            paths.append(f".{key}")
            if raising:
                return None, paths, first
            if copy is None:
                copy = dict(obj)
            del copy[key]
        elif isinstance(value, _CONTAINERS):
            found = _child(value, depth, raising, memo)
            if found is None:
                continue
            first = first or found[2]
            paths.extend(f".{key}{path}" for path in found[1])
            if raising:
                return None, paths, first
            if copy is None:
                copy = dict(obj)
            copy[key] = found[0]
    return None if copy is None else (copy, paths, first)


def _sequence(obj: list[Any] | tuple[Any, ...], depth: int, raising: bool, memo: _Memo) -> _Found:
    kept: list[Any] | None = None
    paths: list[str] = []
    first = ""
    for index, value in enumerate(obj):
        cls = type(value)
        if cls in _SCALARS:
            pass
        elif cls is str or isinstance(value, str):
            kind = looks_like(value)
            if kind is not None:
                first = first or kind
                paths.append(f"[{index}]")
                if raising:
                    return None, paths, first
                if kept is None:
                    kept = list(obj[:index])
                continue
        elif isinstance(value, _CONTAINERS):
            found = _child(value, depth, raising, memo)
            if found is not None:
                first = first or found[2]
                paths.extend(f"[{index}]{path}" for path in found[1])
                if raising:
                    return None, paths, first
                if kept is None:
                    kept = list(obj[:index])
                kept.append(found[0])
                continue
        if kept is not None:
            kept.append(value)
    if kept is None:
        return None
    return (tuple(kept) if isinstance(obj, tuple) else kept), paths, first


def _child(
    obj: Mapping[Any, Any] | list[Any] | tuple[Any, ...], depth: int, raising: bool, memo: _Memo
) -> _Found:
    """What walking a container nested in one at `depth` found; None when it is not walked
    (too deep, or met inside itself)."""
    if depth >= MAX_DEPTH:
        return None
    key = id(obj)
    if key in memo:
        done: _Found = memo[key][1]
        return None if done is _BUSY else done
    memo[key] = (obj, _BUSY)
    if isinstance(obj, Mapping):
        found = _mapping(obj, depth + 1, raising, memo)
    else:
        found = _sequence(obj, depth + 1, raising, memo)
    memo[key] = (obj, found)
    return found
