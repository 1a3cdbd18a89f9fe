"""The module-level API: init(), track(), identify(), flush(), shutdown()."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

import whisperr

from .conftest import API_KEY, Api

pytestmark = pytest.mark.anyio


@pytest.fixture
async def default_reset() -> AsyncIterator[None]:
    yield
    await whisperr.shutdown()


@pytest.mark.usefixtures("default_reset")
async def test_module_level_api_delivers(settings: dict[str, Any], api: Api) -> None:
    """init() then track()/identify()/flush() deliver through the default client."""
    client = whisperr.init(**settings)
    assert whisperr.get_client() is client
    mid = whisperr.track("user_8842", "payment_failed", {"amount_cents": 4900})
    whisperr.identify("user_8842", {"plan": "pro"})
    result = await whisperr.flush()
    assert result.delivered == 2
    assert api.events[0]["context"]["$message_id"] == mid
    closed = await whisperr.shutdown()
    assert closed is not None
    assert closed.pending == 0
    assert await whisperr.shutdown() is None


@pytest.mark.usefixtures("default_reset")
async def test_init_reads_the_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, api: Api
) -> None:
    """api_key falls back to WHISPERR_API_KEY."""
    monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
    client = whisperr.init(transport=api.transport())
    assert client.settings.api_key == API_KEY


@pytest.mark.usefixtures("default_reset")
async def test_init_twice_is_an_error(settings: dict[str, Any]) -> None:
    """A second init() while one is open is refused."""
    whisperr.init(**settings)
    with pytest.raises(whisperr.WhisperrError, match="already"):
        whisperr.init(**settings)


async def test_track_before_init_is_a_clear_error() -> None:
    """Using the module-level API before init() says what to do."""
    with pytest.raises(whisperr.WhisperrError, match=r"whisperr.init"):
        whisperr.track("u", "a_b")
