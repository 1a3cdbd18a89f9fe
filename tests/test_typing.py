"""The settings keywords are typed: a user's type checker flags a misspelt or mistyped one."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import whisperr
from whisperr._config import SettingsArgs

# A user's module; the comment of each line says what mypy must report there.
USER_CODE = """\
import whisperr

whisperr.AsyncClient(flush_intervall=1)  # misspelt
whisperr.AsyncClient(flush_interval="1")  # str
whisperr.Client("wrk_x", max_retries=True, max_batch_size=1.5)  # float
whisperr.Settings.from_env(None, flush_intervall=1)  # misspelt
whisperr.AsyncClient("wrk_x")
whisperr.AsyncClient(whisperr.Settings(api_key="wrk_x"), flush_interval=1, on_error=print)
whisperr.Client(api_key="wrk_x", overflow="drop_newest", pii=None, disabled=True)
"""


def test_mypy_reports_a_misspelt_or_mistyped_setting(tmp_path: Path) -> None:
    """``mypy --strict`` on a user's file: the typo and the wrong type, and nothing else."""
    pytest.importorskip("mypy", reason="mypy is not installed (the test dependency group has it)")
    (tmp_path / "user.py").write_text(USER_CODE)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")  # not the project's configuration, nor the user's
    # The whisperr under test, whether installed or only importable here.
    package_parent = str(Path(whisperr.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-incremental",
            "--config-file", str(config), "--cache-dir", os.devnull,
            "--python-version", "3.10", "user.py",
        ],
        cwd=tmp_path, env=os.environ | {"PYTHONPATH": path},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    errors: dict[int, list[str]] = {}
    for line in result.stdout.splitlines():
        if match := re.match(r"user\.py:(\d+): error: (.*)$", line):
            errors.setdefault(int(match[1]), []).append(match[2])
    # bool is an int to a type checker (the runtime check refuses it): only the float is wrong.
    expected = {
        3: ('"flush_intervall"', "[call-arg]"),
        4: ('"flush_interval"', '"str"', '"float"', "[arg-type]"),
        5: ('"max_batch_size"', '"float"', '"int"', "[arg-type]"),
        6: ('"flush_intervall"', "[call-arg]"),
    }
    assert sorted(errors) == sorted(expected), result.stdout + result.stderr
    for number, parts in expected.items():
        [message] = errors[number]
        assert all(part in message for part in parts), message
    assert result.returncode == 1


def test_the_keywords_annotation_is_not_evaluated_at_import() -> None:
    """``from __future__ import annotations``: Python 3.10 has no typing.Unpack, and needs none."""
    parameter = inspect.signature(whisperr.AsyncClient).parameters["overrides"]
    assert parameter.kind is inspect.Parameter.VAR_KEYWORD
    assert parameter.annotation == "Unpack[SettingsArgs]"
    assert inspect.signature(whisperr.Client).parameters["overrides"].annotation == (
        "Unpack[SettingsArgs]"
    )


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.Unpack is new in Python 3.11")
def test_the_keywords_annotation_resolves_at_runtime() -> None:
    """A tool that resolves a constructor's hints (a DI container) gets the TypedDict."""
    for function in (whisperr.AsyncClient.__init__, whisperr.Client.__init__):
        hints = typing.get_type_hints(function)
        assert hints["overrides"] == typing.Unpack[SettingsArgs]  # type: ignore[attr-defined]  # not in 3.10
    assert typing.get_type_hints(SettingsArgs)["flush_interval"] is float
