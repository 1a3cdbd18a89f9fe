"""Developer tasks: tests on every Python 3.10 to 3.13 found here, lint, typecheck, the sdist,
bench, demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
HERE = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(HERE / "pyproject.toml")
# CI=true (or 1, yes, on), as CI services set it: every Python above must be there.
ON_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}

nox.options.sessions = ["tests", "lint", "typecheck", "sdist"]
nox.options.default_venv_backend = "venv"
nox.options.download_python = "never"
# Locally, run on the interpreters this machine has: a missing one is skipped. On CI it fails.
nox.options.error_on_missing_interpreters = ON_CI


def _add_pyenv_versions_to_path() -> None:
    """Make pyenv's installed interpreters visible as pythonX.Y, when pyenv is present."""
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return
    root = Path(subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip())
    bins = [str(p / "bin") for v in PYTHONS for p in sorted(root.glob(f"versions/{v}.*"))[-1:]]
    os.environ["PATH"] = os.pathsep.join([*bins, os.environ.get("PATH", "")])


_add_pyenv_versions_to_path()


def _needs_a_supported_python(session: nox.Session) -> None:
    """Sessions without python= run on nox's own interpreter: stop early if it is too old."""
    if sys.version_info < (3, 10):  # noqa: UP036 (nox may run on any Python)
        session.error(
            f"whisperr needs Python 3.10 or newer; nox runs on {sys.version.split()[0]} "
            f"({sys.executable}). Run nox with a newer Python: python3.12 -m nox ..."
        )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the typing tests."""
    _needs_a_supported_python(session)
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy")


# Run in the session's Python, from the unpacked tree: the installed package is the one imported.
_CHECK_INSTALLED = """\
import sys, whisperr
if not whisperr.__file__.startswith(sys.prefix):
    sys.exit(f"whisperr imported from {whisperr.__file__}, not from the installed wheel")
print("testing", whisperr.__version__, "from", whisperr.__file__)
"""


@nox.session(python="3.12")
def sdist(session: nox.Session) -> None:
    """The sdist is complete: build it, install it, run the test suite from the unpacked tree."""
    session.install("build")
    with (
        tempfile.TemporaryDirectory(prefix="whisperr-dist-") as dist,
        tempfile.TemporaryDirectory(prefix="whisperr-sdist-") as unpacked,
    ):
        session.run("python", "-m", "build", "--sdist", "--outdir", dist, str(HERE))
        (archive,) = Path(dist).glob("*.tar.gz")
        session.run("python", "-m", "tarfile", "--filter", "data", "-e", str(archive), unpacked)
        (root,) = Path(unpacked).iterdir()
        # The wheel pip would build from the sdist, kept for tests/test_packaging.py to read.
        session.run("python", "-m", "build", "--wheel", "--outdir", dist, str(root))
        (wheel,) = Path(dist).glob("*.whl")
        test_group = nox.project.dependency_groups(
            nox.project.load_toml(root / "pyproject.toml"), "test"
        )
        session.install(str(wheel), *test_group)
        # Without the source package, the tests and the interpreters they start (python -c,
        # with the tree as the working directory) can only import the installed one.
        shutil.rmtree(root / "whisperr")
        with session.chdir(root):
            session.run("python", "-c", _CHECK_INSTALLED)
            env = {"PACKAGING_TEST_SDIST": str(archive), "PACKAGING_TEST_WHEEL": str(wheel)}
            session.run("pytest", *session.posargs, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    """A FastAPI service against the bundled local server; prints what was delivered."""
    _needs_a_supported_python(session)
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "demo"))
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks against the official SDK and peers (writes benchmarks/results/)."""
    _needs_a_supported_python(session)
    session.install("-e", ".")  # the others get their own cached environments
    session.run("python", "benchmarks/run.py", *session.posargs)
