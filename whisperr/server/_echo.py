"""The readable echo: the log lines `create_app(echo=True)` writes for each recorded request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from whisperr.server._app import RequestRecord

_ECHO_EVENT_LINES = 5  # batches up to this size get one echo line per event


def echo_lines(record: RequestRecord, data: Any, events: list[Any], error: str | None) -> list[str]:
    """Describe one request: a head line, then one line per event of a small batch.

    Args:
        record: What the app recorded of the request.
        data: The parsed body (or the marker for one that is not JSON).
        events: The events the body carries, as the app counted them.
        error: The message of the error answer, or None when it answered without one or hung up.

    Returns:
        The lines, without trailing newlines.
    """
    head = f"{record.status or '---'} {record.method} {record.path}"
    if events:
        more = ", ..." if len(events) > 2 else ""
        plural = "s" if len(events) != 1 else ""
        head += f"  {len(events)} event{plural}  ({', '.join(map(_describe, events[:2]))}{more})"
    elif record.path == "/v1/identify" and isinstance(data, dict):
        head += f"  {data.get('external_user_id')}  traits={_short(data.get('traits', {}))}"
    if record.fault is not None:
        head += f"  [fault: {record.fault}]"
    if error is not None and record.fault is None:
        head += f"  {error}"
    small = events if len(events) <= _ECHO_EVENT_LINES else []
    return [head, *(f"    {_describe(e)}  {_short(e)}" for e in small if isinstance(e, dict))]


def _describe(event: Any) -> str:
    if not isinstance(event, dict):
        return "?"
    return f"{event.get('external_user_id')} {event.get('event_type')}"


def _short(value: Any, limit: int = 100) -> str:
    if isinstance(value, dict) and "event_type" in value:
        value = [value.get("occurred_at"), value.get("properties")]
    text = orjson.dumps(value, default=repr).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."
