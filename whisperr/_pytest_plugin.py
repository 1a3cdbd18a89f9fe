"""The pytest plugin (the `whisperr` entry point): the `whisperr_capture` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import _default
from .testing import Capture


@pytest.fixture
def whisperr_capture() -> Iterator[Capture]:
    """A fresh :class:`whisperr.testing.Capture`, also installed as the module-level client.

    ``whisperr.track(...)`` in the code under test is captured; ``await whisperr.flush()``
    delivers it before you assert. The module-level client is forgotten afterwards.
    """
    if _default._default is not None:
        raise RuntimeError("whisperr.init() was already called; whisperr_capture needs it unset")
    capture = Capture()
    _default.init(**capture.settings)
    try:
        yield capture
    finally:
        _default._default = None
