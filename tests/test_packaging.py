"""Packaging: the license, the project URLs, an sdist the test suite passes from, and the names
the package shows (``whisperr.InvalidEventError``, a clean ``dir(whisperr)``).

The wheel and the sdist are built from this tree without network (``python -m build
--no-isolation``: the test dependency group brings build and hatchling). Under ``nox -s sdist``
the tests read the artifacts that session built and installed instead, named by
PACKAGING_TEST_SDIST and PACKAGING_TEST_WHEEL.
"""

from __future__ import annotations

import email.message
import email.parser
import importlib
import os
import pickle
import subprocess
import sys
import tarfile
import traceback
import types
import typing
import zipfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import whisperr

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/whisperr/whisperr-async"
PUBLIC_CLASSES = [name for name in whisperr.__all__ if isinstance(getattr(whisperr, name), type)]
EXCEPTIONS = [name for name in PUBLIC_CLASSES if issubclass(getattr(whisperr, name), Exception)]


def _artifact(kind: str, variable: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel or sdist that nox -s sdist names in ``variable``, else one built from ROOT."""
    given = os.environ.get(variable)
    if given:
        return Path(given)
    for module in ("build", "hatchling"):
        pytest.importorskip(module, reason=f"{module} is in the test dependency group: install it")
    out = tmp_path_factory.mktemp(kind)
    command = [sys.executable, "-m", "build", "--no-isolation", f"--{kind}", "--outdir", str(out)]
    result = subprocess.run(
        [*command, str(ROOT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (artifact,) = out.iterdir()
    return artifact


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(_artifact("wheel", "PACKAGING_TEST_WHEEL", tmp_path_factory)) as zf:
        yield zf


@pytest.fixture(scope="module")
def metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode())


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The sdist's file names, without the top directory (``whisperr_async-0.1.0/``)."""
    with tarfile.open(_artifact("sdist", "PACKAGING_TEST_SDIST", tmp_path_factory)) as tf:
        names = [member.name for member in tf.getmembers() if member.isfile()]
    tops = {name.split("/", 1)[0] for name in names}
    assert len(tops) == 1, tops
    return {name.split("/", 1)[1] for name in names}


def test_license_is_mit_by_the_contributors() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 whisperr contributors\n" in text
    assert "Permission is hereby granted, free of charge, to any person obtaining a copy" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_the_wheel_carries_the_license(
    wheel: zipfile.ZipFile, metadata: email.message.Message
) -> None:
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    (license_file,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_file).decode() == (ROOT / "LICENSE").read_text()


def test_the_wheel_is_typed_and_holds_the_package(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {"whisperr/__init__.py", "whisperr/py.typed", "whisperr/_client.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "examples/"))]


def test_the_project_urls(metadata: email.message.Message) -> None:
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL", []))
    assert urls == {
        "Homepage": REPOSITORY,
        "Documentation": f"{REPOSITORY}#readme",
        "Changelog": f"{REPOSITORY}/blob/main/CHANGELOG.md",
        "Issues": f"{REPOSITORY}/issues",
    }


def test_the_sdist_holds_what_the_test_suite_needs(sdist_files: set[str]) -> None:
    top_level = {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "noxfile.py", "PKG-INFO"}
    assert top_level <= sdist_files
    assert {"whisperr/__init__.py", "whisperr/py.typed"} <= sdist_files
    # Every test, its data, and every example the tests run (examples/django_app/ too).
    here = {
        path.relative_to(ROOT).as_posix()
        for folder in ("tests", "examples")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in {".py", ".json"} and "__pycache__" not in path.parts
    }
    assert "examples/django_app/manage.py" in here
    assert "tests/conformance/wire.json" in here
    assert here <= sdist_files, sorted(here - sdist_files)
    assert not [n for n in sdist_files if "__pycache__" in n or n.endswith(".pyc")]


@pytest.mark.parametrize("name", PUBLIC_CLASSES)
def test_public_classes_are_named_after_the_package(name: str) -> None:
    cls = getattr(whisperr, name)
    assert (cls.__module__, cls.__qualname__) == ("whisperr", name)
    assert str(cls) == f"<class 'whisperr.{name}'>"
    # pickle finds a class by these two names; type hints are looked up in __module__.
    assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
    typing.get_type_hints(cls)
    if attrs.has(cls):
        attrs.resolve_types(cls)


def test_tracebacks_name_the_public_exception() -> None:
    exc = whisperr.InvalidEventError("event_type", "is required")
    assert traceback.format_exception_only(exc) == [
        "whisperr.InvalidEventError: event_type: is required\n"
    ]
    assert repr(exc) == "InvalidEventError('event_type: is required')"
    with pytest.raises(whisperr.ConfigError) as raised:  # raised inside whisperr._config
        whisperr.Settings(api_key="wrk_test", max_batch_size=0)
    (line,) = traceback.format_exception_only(raised.value)
    assert line.startswith("whisperr.ConfigError: "), line


def test_an_uncaught_error_prints_the_public_name() -> None:
    code = "import whisperr\nwhisperr.Settings(api_key='wrk_test', max_batch_size=0)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("whisperr.ConfigError: "), result.stderr


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(whisperr.WhisperrError("boom"), id="WhisperrError"),
        pytest.param(whisperr.ConfigError("max_batch_size: must be >= 1"), id="ConfigError"),
        pytest.param(whisperr.ClientClosedError("closed"), id="ClientClosedError"),
        pytest.param(
            whisperr.InvalidEventError("event_type", "is required"),
            id="InvalidEventError",
        ),
        pytest.param(
            whisperr.SendError(
                "503", message_id="m1", status=503, code=None, retryable=True, attempts=3
            ),
            id="SendError",
        ),
        pytest.param(
            whisperr.DeliveryReport("dropped", "queue_overflow", "full", count=2), id="report"
        ),
        pytest.param(whisperr.FlushResult(3, 1, 0, timed_out=False), id="FlushResult"),
        pytest.param(whisperr.Settings(api_key="wrk_test", max_batch_size=7), id="Settings"),
    ],
)
def test_pickle_round_trips_by_the_public_path(value: object) -> None:
    data = pickle.dumps(value)
    assert b"whisperr._" not in data  # stored as whisperr.<Name>: moving a module keeps it
    copy = pickle.loads(data)
    assert type(copy) is type(value)
    if isinstance(value, Exception):
        assert copy.args == value.args
        assert vars(copy) == vars(value)
    else:
        assert copy == value
        assert repr(copy) == repr(value)
        assert repr(copy).startswith(f"{type(value).__name__}(")


def test_dir_lists_the_public_names_only() -> None:
    names = dir(whisperr)
    assert names == sorted(names)
    assert "annotations" not in names
    assert not hasattr(whisperr, "annotations")
    private = [
        n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))
    ]
    assert private == []
    assert set(whisperr.__all__) <= set(names)
    assert "billing" in names  # a public submodule, imported by the package itself
    others = {n for n in names if not n.startswith("_")} - set(whisperr.__all__)
    assert all(isinstance(getattr(whisperr, n), types.ModuleType) for n in others), others


def test_dir_in_a_fresh_interpreter() -> None:
    """What a user sees, without pytest's imports (or its assertion rewriting's names)."""
    code = "import whisperr\nprint(*(n for n in dir(whisperr) if not n.startswith('_')))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    expected = {n for n in whisperr.__all__ if not n.startswith("_")} | {"billing"}
    assert sorted(result.stdout.split()) == sorted(expected)


def test_every_name_in_dir_imports() -> None:
    for name in dir(whisperr):
        namespace: dict[str, object] = {}
        exec(f"from whisperr import {name}", namespace)  # the statement a user writes
        assert namespace[name] is getattr(whisperr, name)


def test_private_submodules_still_import() -> None:
    import whisperr._client
    import whisperr._models

    assert whisperr._client.AsyncClient is whisperr.AsyncClient
    assert importlib.import_module("whisperr._errors").InvalidEventError is (
        whisperr.InvalidEventError
    )
    assert "_models" not in dir(whisperr)  # an attribute still, only not listed
    assert whisperr._models.Stats is whisperr.Stats


def test_every_public_name_has_a_home_and_import_whisperr_stays_light() -> None:
    """whisperr/__init__ loads its public names on first use: each must be listed there, and
    `import whisperr` alone imports none of the dependencies."""
    assert set(whisperr._HOMES) | {"__version__"} == set(whisperr.__all__)
    code = (
        "import sys, whisperr; heavy = {'httpx', 'anyio', 'attrs', 'orjson'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
