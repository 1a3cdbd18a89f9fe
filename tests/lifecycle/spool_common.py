"""What the spool scripts (tests/test_spool.py) share.

Import it right after probe and BEFORE whisperr: it registers an exit hook that runs after
whisperr's (atexit runs hooks last in, first out) and before probe's, and adds every watched
client's full stats (spooled, replayed, identified included) to the LIFECYCLE line, as
``notes["stats"][name]``. Settings come from the WHISPERR_* environment (WHISPERR_SPOOL_PATH).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from typing import Any

import probe

full_stats = probe.stats  # every counter the spool tests read (spooled, replayed...)


def say(tag: str, **values: Any) -> None:
    """One line to stdout for the test to wait for: `TAG {json}`."""
    print(f"{tag} {json.dumps(values)}", flush=True)


def _note_stats() -> None:
    if os.getpid() != probe._pid:
        return
    probe.note(stats={name: full_stats(c) for name, c in probe._clients.items()})


atexit.register(_note_stats)
if "whisperr" in sys.modules:
    raise RuntimeError("import spool_common before whisperr")
