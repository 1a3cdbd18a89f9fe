"""The public surface is exactly what __all__ lists."""

from __future__ import annotations

import types

import whisperr


def test_all_is_sorted_and_complete() -> None:
    """Every public name of the package is in __all__, sorted, and importable."""
    dir(whisperr)  # the package loads its public names on first use: load them here
    public = {
        name
        for name, value in vars(whisperr).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    public -= {"annotations"}
    assert sorted(whisperr.__all__) == whisperr.__all__
    assert public == set(whisperr.__all__) - {"__version__"}
    for name in whisperr.__all__:
        assert getattr(whisperr, name) is not None
