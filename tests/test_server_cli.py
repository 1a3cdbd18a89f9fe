"""The command line of the bundled server, `python -m whisperr.server`, run as a real process.

Each test starts the server with `sys.executable -m whisperr.server` and bounds every wait on
it (a subprocess timeout, or a queue read with a timeout), so a server that hangs fails the
test instead of stalling the run. Nothing connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO

import httpx
import pytest

from whisperr.server.__main__ import _bind_failure

COMMAND = [sys.executable, "-m", "whisperr.server"]
RUN_TIMEOUT = 30.0  # seconds a short-lived server run may take (interpreter start included)
START_TIMEOUT = 30.0  # seconds until a server prints the line naming its URL
STOP_TIMEOUT = 10.0  # seconds a server may take to exit once signalled
BANNER = re.compile(r"^Whisperr local server listening on (http://127\.0\.0\.1:(\d+))  ")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERR_")}
    return env | {"PYTHONUNBUFFERED": "1"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=_env(),
        check=False,
    )


def _flat(text: str) -> str:
    """`text` with every run of whitespace made one space (argparse wraps to the terminal)."""
    return " ".join(text.split())


def _option_entries(help_text: str) -> dict[str, str]:
    """The entries of the `options:` section of `--help`, keyed by their first option string."""
    section = help_text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    current = ""
    for line in section.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        else:
            entries[current] += " " + line
    return {option: _flat(text) for option, text in entries.items()}


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a socket of this test is bound to and listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


class TestHelp:
    def test_help_shows_defaults_purpose_and_an_example(self) -> None:
        """--help names the default port, the any-key behaviour, every default and an example."""
        done = _run("--help")
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        text = _flat(done.stdout)
        assert "(default: 8787)" in text
        assert "without --api-key any key is accepted" in text
        assert "for development, tests" in text
        assert "python -m whisperr.server --port 8787 --api-key wrk_local" in text
        assert (
            "exit status: 0 when stopped by SIGTERM, 130 by Ctrl-C (SIGINT), 2 on a usage" in text
        )
        for fault_option in ("--fault-mix", "--latency", "--seed", "faults.script("):
            assert fault_option in text

    def test_every_option_states_its_default(self) -> None:
        """Each option but --help says what happens without it."""
        entries = _option_entries(_run("--help").stdout)
        assert {"--host", "--port", "--api-key", "--fault-mix", "--no-validate"} <= set(entries)
        missing = [o for o, text in entries.items() if o != "-h" and "default: " not in text]
        assert missing == [], entries
        assert "(default: 127.0.0.1)" in entries["--host"]
        assert "(default: 8787)" in entries["--port"]


class TestBindErrors:
    def test_port_in_use_is_one_line_on_stderr(self, held_port: int) -> None:
        """A port another socket holds: exit 2, one line naming host and port, no traceback."""
        done = _run("--port", str(held_port))
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert done.stderr.splitlines() == [
            f"whisperr.server: port {held_port} on 127.0.0.1 is in use "
            "(try --port 0 for a free one)"
        ]
        assert "listening on" not in done.stdout

    def test_bad_port_number_is_a_usage_error(self) -> None:
        """A port outside 0-65535 is refused by argparse, not by a traceback from bind()."""
        done = _run("--port", "70000")
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert done.stderr.splitlines()[-1].endswith(
            "argument --port: a port is 0 to 65535, got 70000"
        )

    @pytest.mark.parametrize(
        ("code", "hint"),
        [
            (errno.EACCES, "ports below 1024 usually need privileges"),
            (errno.EADDRNOTAVAIL, "not an address of this machine"),
            (errno.EMFILE, None),
        ],
    )
    def test_other_bind_errors_name_host_port_and_reason(self, code: int, hint: str | None) -> None:
        """The line names the host, the port and the OS's reason (asyncio's wording dropped)."""
        # As asyncio raises it: errno kept, the message rewritten.
        exc = OSError(code, f"error while attempting to bind on address ('10.1.2.3', 80): x{code}")
        line = _bind_failure("10.1.2.3", 80, exc)
        assert line.startswith(f"cannot listen on 10.1.2.3 port 80: {os.strerror(code)}")
        assert "error while attempting" not in line
        assert "\n" not in line
        if hint is None:
            assert line == f"cannot listen on 10.1.2.3 port 80: {os.strerror(code)}"
        else:
            assert hint in line


class _Lines:
    """Reads a stream line by line in a thread, so that waiting for a line can be bounded."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line, or None at the end of the stream; raises queue.Empty on timeout."""
        line = self._queue.get(timeout=timeout)
        if line is not None:
            self.seen.append(line)
        return line

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_port_0_prints_its_url_serves_and_stops_quietly(signum: int, status: int) -> None:
    """`--port 0` prints the URL it listens on; SIGINT exits 130 and SIGTERM 0, both quietly."""
    with subprocess.Popen(
        [*COMMAND, "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    ) as process:
        assert process.stdout is not None
        lines = _Lines(process.stdout)
        try:
            assert process.stderr is not None
            banner = lines.next(START_TIMEOUT)
            assert banner is not None, process.stderr.read()
            found = BANNER.match(banner)
            assert found is not None, banner
            url, port = found[1], int(found[2])
            assert port != 0
            answer = httpx.get(f"{url}/_local/events", timeout=10.0)
            assert answer.status_code == 200
            assert answer.json()["events"] == []
            process.send_signal(signum)
            assert process.wait(timeout=STOP_TIMEOUT) == status
            assert process.stderr.read() == ""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(STOP_TIMEOUT)
            lines.join(STOP_TIMEOUT)  # the pump must be done before Popen closes the pipe
