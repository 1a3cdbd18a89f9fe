"""Developer tasks: tests on every Python 3.10 to 3.13 found here, lint, typecheck, bench, demo."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
PYPROJECT = nox.project.load_toml("pyproject.toml")

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"
nox.options.download_python = "never"
# Run on the interpreters this machine has; a missing one is skipped, not an error.
nox.options.error_on_missing_interpreters = False


def _add_pyenv_versions_to_path() -> None:
    """Make pyenv's installed interpreters visible as pythonX.Y, when pyenv is present."""
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return
    root = Path(subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip())
    bins = [str(p / "bin") for v in PYTHONS for p in sorted(root.glob(f"versions/{v}.*"))[-1:]]
    os.environ["PATH"] = os.pathsep.join([*bins, os.environ.get("PATH", "")])


_add_pyenv_versions_to_path()


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
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """A FastAPI service against the bundled local server; prints what was delivered."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "demo"))
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks against the official SDK and peers (writes benchmarks/results/)."""
    session.install("-e", ".")  # the others get their own cached environments
    session.run("python", "benchmarks/run.py", *session.posargs)
