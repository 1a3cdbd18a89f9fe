"""The pytest plugin (the `whisperr` entry point): the `whisperr_capture` fixture.

pytest imports this module at every start, in every project whose environment has whisperr:
it imports nothing but pytest here, and the test kit only when a test uses the fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import Capture


@pytest.fixture
def whisperr_capture() -> Iterator[Capture]:
    """A fresh :class:`whisperr.testing.Capture`, installed as the module-level client.

    ``whisperr.track(...)`` in the code under test is captured, from any thread or event loop;
    ``whisperr.init(...)`` returns the capture's client (its settings unused) and
    ``whisperr.shutdown()`` only flushes it. Reading the capture (``events``,
    ``assert_tracked(...)``) first waits for delivery: no flush is needed, in plain or async
    tests. Afterwards the client is closed and a module-level client set aside is back.
    See :meth:`Capture.installed`.
    """
    from .testing import Capture

    capture = Capture()
    with capture.installed():
        yield capture
