"""Plumbing for the benchmarks: cached venvs, local server processes, worker subprocesses, and
other versions of this SDK (a git ref extracted into a temporary directory).

Standard library only, so that run.py works from any interpreter that can see this project.
All traffic goes to 127.0.0.1; every subprocess has a timeout; servers are always stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORKERS = BENCH_DIR / "workers"
OFFICIAL_PIN = "whisperr==0.2.1"
OTHER_PACKAGES = ("segment-analytics-python", "posthog")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
# Never through a proxy: every request here goes to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- environments ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "whisperr-bench"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _works(python: str | Path, code: str) -> bool:
    try:
        done = subprocess.run(
            [str(python), "-c", code],
            capture_output=True,
            timeout=120,
            env=clean_env(),
            cwd=tempfile.gettempdir(),  # `-c` puts the cwd on sys.path: never the repo's whisperr
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_venv(venv: Path, packages: Sequence[str], check: str) -> Path:
    """A cached venv holding ``packages``; (re)built when ``check`` fails in it."""
    python = venv_python(venv)
    if python.exists() and _works(python, check):
        return python
    log(f"[setup] creating {venv} with {' '.join(packages)}")
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *packages], check=True, timeout=900, env=clean_env())
    if not _works(python, check):
        raise RuntimeError(f"{venv}: installed {packages} but `{check}` still fails")
    return python


def official_python(cache: Path) -> Path:
    check = "import whisperr; assert whisperr.__version__ == '0.2.1'; whisperr.Whisperr"
    return ensure_venv(cache / "official-0.2.1", [OFFICIAL_PIN], check)


def others_python(cache: Path) -> Path:
    """segment and posthog: the current interpreter if it has both, else a cached venv."""
    check = "import segment.analytics, posthog"
    if _works(sys.executable, check):
        return Path(sys.executable)
    return ensure_venv(cache / "segment-posthog", list(OTHER_PACKAGES), check)


def chart_python(cache: Path, install: bool) -> Path | None:
    """An interpreter with matplotlib: this one, or with ``install`` a cached venv; else None."""
    check = "import matplotlib"
    if _works(sys.executable, check):
        return Path(sys.executable)
    venv = cache / "chart"
    if _works(venv_python(venv), check):
        return venv_python(venv)
    if not install:
        return None
    return ensure_venv(venv, ["matplotlib"], check)


def ours_python(explicit: str | None) -> Path:
    """An interpreter where ``import whisperr`` is this project (it has AsyncClient and server)."""
    check = "import whisperr, whisperr.server; whisperr.AsyncClient; whisperr.server.LocalServer"
    candidates = [explicit] if explicit else [sys.executable, str(venv_python(REPO / ".venv"))]
    for candidate in candidates:
        if candidate and Path(candidate).exists() and _works(candidate, check):
            return Path(candidate)
    raise SystemExit(
        "cannot find an interpreter where `import whisperr` is this project: install it "
        "(pip install -e .) or pass --ours-python"
    )


def package_version(python: Path, dist: str) -> str:
    code = f"from importlib.metadata import version; print(version({dist!r}))"
    done = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
        check=False,
    )
    return done.stdout.strip() or "?"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS and k != "PYTHONPATH"}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def version_env(root: Path | None) -> dict[str, str]:
    """:func:`clean_env`, with ``import whisperr`` finding the version under ``root`` if given."""
    env = clean_env()
    if root is not None:
        env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    return env


# -- versions of this SDK --------------------------------------------------------------------


def git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def describe(tree: Path, ref: str = "HEAD", check_dirty: bool = True) -> str:
    """The full commit of ``ref`` in ``tree``, and whether the tree differs from it (outside
    benchmarks/, which is not what is measured)."""
    sha = git(tree, "rev-parse", f"{ref}^{{commit}}")
    dirty = check_dirty and git(tree, "status", "--porcelain", "--", ".", ":!benchmarks")
    return sha + (" + uncommitted changes" if dirty else "")


def imported_from(file: str, root: Path) -> bool:
    return Path(file).resolve().is_relative_to(root.resolve())


@contextlib.contextmanager
def source_tree(spec: str) -> Iterator[tuple[Path, str]]:
    """``(root, what)`` for a version of this SDK: ``spec`` is a directory (a work tree, used as
    it is) or a git ref of this repository, extracted with ``git archive`` into a temporary
    directory that is removed afterwards. ``root`` is where ``import whisperr`` finds it (its
    ``src/`` if it has that layout); ``what`` names the commit.
    """
    if Path(spec).is_dir():
        tree = Path(spec).resolve()
        try:
            what = f"{tree} = {describe(tree)}"
        except (OSError, subprocess.SubprocessError):
            what = f"{tree} (not a git work tree)"
        yield _import_root(tree), what
        return
    try:
        sha = describe(REPO, spec, check_dirty=False)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{spec!r}: not a directory nor a git ref: {exc.stderr.strip()}") from None
    with tempfile.TemporaryDirectory(prefix="whisperr-ref-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", sha], capture_output=True, check=True, timeout=120
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True, timeout=120)
        yield _import_root(Path(tmp)), f"{spec} = {sha}"


def _import_root(tree: Path) -> Path:
    return tree / "src" if (tree / "src" / "whisperr").is_dir() else tree


def callgrind_count(command: Sequence[str], root: Path, timeout: float = 1200) -> int | None:
    """The instructions callgrind counts for ``command`` (``whisperr`` from ``root``); None if
    valgrind is missing, the command fails or the count is not reported."""
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    try:
        done = subprocess.run(
            [*valgrind, *command],
            capture_output=True, text=True, env=version_env(root), cwd=tempfile.gettempdir(),
            timeout=timeout, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    collected = [line for line in done.stderr.splitlines() if "Collected" in line]
    return int(collected[-1].split()[-1]) if collected and done.returncode == 0 else None


# -- the local server ----------------------------------------------------------------------


class Server:
    """``python -m whisperr.server`` in its own process on 127.0.0.1 (a free port, real sockets).

    By default it runs with ``--no-validate``: it deduplicates and counts batched events by
    ``$message_id`` without checking their fields, so that what is measured is the SDKs, not
    the server (validating costs it about 9 us an event; the test suite covers what the SDKs
    send). ``validate=True`` checks every event as the real API would.
    """

    def __init__(
        self, python: Path, *args: str, root: Path | None = None, validate: bool = False
    ) -> None:
        self._root = root  # where `import whisperr` finds the server (default: as installed)
        self._cmd = [
            *(str(python), "-m", "whisperr.server", "--quiet", "--port", "0"),
            *(() if validate else ("--no-validate",)),
            *args,
        ]
        self._proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> Server:
        self._proc = subprocess.Popen(
            self._cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=version_env(self._root),
            cwd=tempfile.gettempdir(),
        )
        found: list[str] = []
        reader = threading.Thread(target=self._read_url, args=(found,), daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop()
            raise RuntimeError(f"the local server did not start: {' '.join(self._cmd)}")
        self.url = found[0]
        return self

    def _read_url(self, found: list[str]) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            match = re.search(r"http://127\.0\.0\.1:\d+", line)
            if match:
                found.append(match.group(0))
                return

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, method: str, path: str) -> Any:
        data = b"{}" if method == "POST" else None
        request = urllib.request.Request(self.url + path, method=method, data=data)
        with _OPENER.open(request, timeout=120) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        self._call("POST", "/_local/reset")

    def counts(self) -> dict[str, int]:
        """What the server holds: events stored (deduplicated on $message_id) and lenient count."""
        data = self._call("GET", "/_local/events")
        ids = {e["context"]["$message_id"] for e in data["events"]}
        return {"stored": len(data["events"]), "unique": len(ids), "lenient": data["lenient_count"]}


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """A URL on 127.0.0.1 where a bound, non-listening socket refuses every connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# -- workers -----------------------------------------------------------------------------------


def run_worker(
    python: Path, script: str, spec: dict[str, Any], timeout: float, root: Path | None = None
) -> dict[str, Any]:
    """Run one worker in a subprocess and return its RESULT, or an ``error`` record.

    With ``root``, the worker's ``whisperr`` is the version there (``PYTHONPATH``); a worker
    that reports the ``file`` it imported is checked to have imported it from there.
    """
    cmd = [str(python), str(WORKERS / script), json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=version_env(root),
            cwd=tempfile.gettempdir(),  # so the repo's own `whisperr` can never shadow a venv's
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"killed after {timeout:.0f} s", "returned": False}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            result["wall_s"] = time.perf_counter() - t0
            if root is not None and not imported_from(str(result.get("file", root)), root):
                return {"error": f"imported {result['file']}, not a file under {root}"}
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: {' | '.join(tail)}", "returned": False}


# -- alternating rounds --------------------------------------------------------------------


def rotated(names: Sequence[str], turn: int) -> list[str]:
    """``names`` rotated by ``turn``, so that no variant always runs first on a warm box."""
    k = turn % len(names)
    return [*names[k:], *names[:k]]


def alternate(
    kind: str, rounds: int, names: Sequence[str], measure: Callable[[str], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """``measure(name)`` for every name, ``rounds`` times, the order rotated every round; the
    results without an ``error``, by name (a failed one is printed and left out)."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rnd in range(rounds):
        log(f"[{kind}] round {rnd + 1}/{rounds}")
        for name in rotated(names, rnd):
            got = measure(name)
            if "error" in got:
                print(f"{name} {kind} round {rnd + 1} FAILED: {got['error']}")
            else:
                results[name].append(got)
    return results


def samples(
    results: Mapping[str, list[dict[str, Any]]], key: str, scale: float = 1.0
) -> dict[str, list[float]]:
    """Each variant's ``key`` over its rounds (times ``scale``)."""
    return {name: [float(r[key]) * scale for r in runs] for name, runs in results.items()}


def report(
    title: str,
    unit: str,
    values: Mapping[str, list[float]],
    labels: Mapping[str, str],
    ratios: Sequence[tuple[str, str]],
    higher: bool,
    digits: int = 0,
) -> dict[str, float]:
    """Print a markdown table of each variant's median, spread and rounds, then the ratios of
    the medians for the ``(a, b)`` pairs in ``ratios``; return the medians."""
    better = "higher" if higher else "lower"
    print(f"\n## {title}\n\n| variant | {unit}, median | min to max | every round |")
    print("|---|---:|---:|---|")
    medians: dict[str, float] = {}
    for name, got in values.items():
        if not got:
            print(f"| {labels[name]} | n/a | | |")
            continue
        medians[name] = statistics.median(got)
        every = " ".join(f"{v:,.{digits}f}" for v in got)
        spread = f"{min(got):,.{digits}f} to {max(got):,.{digits}f}"
        print(f"| {labels[name]} | {medians[name]:,.{digits}f} | {spread} | {every} |")
    print(f"\nratios of the medians ({better} is better):")
    for a, b in ratios:
        if a in medians and b in medians:
            print(f"- {a} ÷ {b}: {medians[a] / medians[b]:.3f}x")
    return medians


# -- reporting helpers -----------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str:
    """The repository's commit, and whether the work tree differs from it (outside benchmarks/)."""
    try:
        sha, _, dirty = describe(REPO).partition(" + ")
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"commit {sha[:7]}" + (" with uncommitted changes" if dirty else "")


def machine_line() -> str:
    load = ""
    with contextlib.suppress(OSError, AttributeError):
        load = " | load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return (
        f"Python {platform.python_version()} ({platform.python_implementation()}) | "
        f"{platform.platform()} | {os.cpu_count()} CPUs | {cpu_model()}{load}"
    )
