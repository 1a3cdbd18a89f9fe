"""The default transport through a real forward proxy and over TLS with a private CA.

Every test drives the public client over real sockets on 127.0.0.1, under asyncio and trio:
the bundled `LocalServer` for plain http, the same app served by uvicorn over TLS with a
trustme CA for https, and proxy.py (a forward proxy from PyPI, run as a subprocess) in between
where a test says so. The evidence is what the server stored and what the proxy recorded: a
plugin makes the proxy append one JSON line per request it handles (each plain-http request,
each CONNECT) before it forwards it, so a request the proxy did not record did not pass it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import trustme
import uvicorn

import whisperr
from whisperr import DeliveryReport
from whisperr.server import LocalServer, WhisperrApp, create_app

from .conftest import API_KEY

pytestmark = pytest.mark.anyio

BATCH = "/v1/events/batch"
EVENTS = 5  # with max_batch_size=2: three batch requests, some on a reused connection
ENV_VARS = [
    *(f"{n}_PROXY" for n in ("HTTP", "HTTPS", "ALL", "NO")),
    *(f"{n}_proxy" for n in ("http", "https", "all", "no")),
    *("SSL_CERT_FILE", "SSL_CERT_DIR"),
    *(f"WHISPERR_{n}" for n in ("PROXY", "VERIFY", "TRUST_ENV", "BASE_URL", "API_KEY")),
]
PLUGIN = '''
import json, os
from proxy.http.proxy import HttpProxyBasePlugin

class RecordingPlugin(HttpProxyBasePlugin):
    """Appends each request the proxy handles to $RECORD_FILE, before it is forwarded."""

    def handle_client_request(self, request):
        text = lambda b: None if b is None else b.decode("latin-1")
        record = {
            "method": text(request.method), "host": text(request.host),
            "port": request.port, "path": text(request.path),
            "headers": [[text(k), text(v)] for k, v in (request.headers or {}).values()],
        }
        with open(os.environ["RECORD_FILE"], "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\\n")
        return request
'''


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA variable of the machine running the tests leaks into a test."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@attrs.frozen
class Proxy:
    """A running proxy.py: its URL, its request records and its own log."""

    url: str
    record_file: Path
    log_file: Path

    def records(self, port: int) -> list[dict[str, Any]]:
        """What the proxy handled for the origin on ``port`` of 127.0.0.1/localhost."""
        lines = self.record_file.read_text(encoding="utf-8").splitlines()
        return [r for r in map(json.loads, lines) if r["port"] == port]


@pytest.fixture(scope="module")
def proxy_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """proxy.py on 127.0.0.1 (an ephemeral port it writes to a file), stopped after the module."""
    if importlib.util.find_spec("proxy") is None:
        pytest.skip("proxy.py is not installed (it is in the test dependency group)")
    root = tmp_path_factory.mktemp("proxy")
    (root / "recording_plugin.py").write_text(PLUGIN, encoding="utf-8")
    port_file, record_file, log_file = root / "port", root / "records.jsonl", root / "proxy.log"
    record_file.touch()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env |= {"PYTHONPATH": str(root), "RECORD_FILE": str(record_file)}
    args = ["--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    args += ["--num-acceptors", "1", "--num-workers", "1", "--data-dir", str(root / "data")]
    args += ["--plugins", "recording_plugin.RecordingPlugin", "--log-file", str(log_file)]
    with (root / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            env=env,
            cwd=root,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        port = wait_for_port(process, port_file)
        yield Proxy(f"http://127.0.0.1:{port}", record_file, log_file)
    finally:
        process.send_signal(signal.SIGINT)  # proxy.py stops its acceptor on SIGINT
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the session this fixture started
            process.wait(10)


def wait_for_port(process: subprocess.Popen[bytes], port_file: Path) -> int:
    """The proxy's port once it accepts a connection; fails after 20 s or if it exits."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            port = int(port_file.read_text())
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except (OSError, ValueError):
            time.sleep(0.02)  # polling a subprocess's readiness, bounded by the deadline
    output = "".join(f.read_text() for f in port_file.parent.glob("*.log"))[-2000:]
    pytest.fail(f"proxy.py did not start (exit code {process.poll()}):\n{output}")


@pytest.fixture
def proxy(proxy_process: Proxy) -> Proxy:
    proxy_process.record_file.write_text("")
    return proxy_process


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


@attrs.frozen
class Trust:
    """A private CA as the client may be told to trust it."""

    ca: trustme.CA
    file: str
    dir: str | None  # hashed-name directory for SSL_CERT_DIR/capath; None without openssl

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Trust:
    ca, root = trustme.CA(), tmp_path_factory.mktemp("ca")
    ca.cert_pem.write_to_path(ca_file := root / "ca.pem")
    openssl, ca_dir = shutil.which("openssl"), root / "certs"
    if openssl is None:
        return Trust(ca, str(ca_file), None)
    command = [openssl, "x509", "-hash", "-noout", "-in", str(ca_file)]
    subject_hash = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    ca_dir.mkdir()
    shutil.copy(ca_file, ca_dir / f"{subject_hash.strip()}.0")  # what `openssl rehash` names it
    return Trust(ca, str(ca_file), str(ca_dir))


class TlsServer:
    """The bundled app served over TLS by uvicorn in a thread, on 127.0.0.1 as `localhost`."""

    def __init__(self, ca: trustme.CA, directory: Path) -> None:
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(key := directory / "server.key")
        cert.cert_chain_pems[0].write_to_path(crt := directory / "server.pem")
        self.app: WhisperrApp = create_app(api_key=API_KEY)
        tls = {"ssl_keyfile": str(key), "ssl_certfile": str(crt)}
        quiet = {"log_config": None, "access_log": False, "lifespan": "off", "ws": "none"}
        self._server = uvicorn.Server(uvicorn.Config(self.app, http="h11", **tls, **quiet))
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"https://localhost:{self.port}"
        self._thread = threading.Thread(
            target=self._server.run, args=([self._socket],), daemon=True
        )

    def __enter__(self) -> TlsServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive():
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)  # polling a thread's readiness, bounded by the deadline
        assert self._server.started, "uvicorn stopped while starting"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()


@pytest.fixture
def tls_server(trust: Trust, tmp_path: Path) -> Iterator[TlsServer]:
    with TlsServer(trust.ca, tmp_path) as running:
        yield running


@attrs.define
class Run:
    """One client's life: what it tracked, what it reported, what it counted at the end."""

    ids: list[str]
    reports: list[DeliveryReport]
    stats: whisperr.Stats


async def deliver(base_url: str, **options: Any) -> Run:
    """Track EVENTS events with a fresh AsyncClient and close it (deadline-bound)."""
    reports: list[DeliveryReport] = []
    with anyio.fail_after(30):
        options = {"max_batch_size": 2, "backoff_base": 0.01, "backoff_cap": 0.05} | options
        client = whisperr.AsyncClient(
            api_key=API_KEY, base_url=base_url, on_error=reports.append, **options
        )
        ids = [client.track(f"user_{i}", "plan_upgraded", {"k": i}) for i in range(EVENTS)]
        await client.aclose(timeout=10)
    return Run(ids, reports, client.stats())


def assert_stored(app: WhisperrApp, run: Run) -> None:
    """Every event was delivered, and the server stored each exactly once."""
    assert sorted(e["context"]["$message_id"] for e in app.events) == sorted(run.ids)
    assert (run.stats.delivered, run.stats.dropped) == (EVENTS, 0)


def assert_through_proxy(proxy: Proxy, server: LocalServer, batches: int = 3) -> None:
    """Each batch request the server answered was forwarded by the proxy, in absolute form."""
    answered = [r.status for r in server.app.requests if r.path == BATCH]
    assert answered == [202] * batches
    seen = [(r["method"], r["host"], r["path"]) for r in proxy.records(port_of(server.url))]
    assert seen == [("POST", "127.0.0.1", BATCH)] * batches


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- plain http through the proxy -------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
async def test_environment_proxy_carries_plain_http(
    variable: str, proxy: Proxy, server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only a proxy variable set (no SDK setting), every batch goes through the proxy."""
    monkeypatch.setenv(variable, proxy.url)
    run = await deliver(server.url)
    assert_stored(server.app, run)
    assert_through_proxy(proxy, server)


PROXY, DEAD = "<proxy>", "<dead>"  # stand-ins for the proxy's URL and a port nothing serves


@pytest.mark.parametrize(
    ("env", "options"),
    [
        pytest.param({"HTTP_PROXY": PROXY, "NO_PROXY": "127.0.0.1"}, {}, id="NO_PROXY"),
        pytest.param({"all_proxy": PROXY, "no_proxy": "localhost,127.0.0.1"}, {}, id="no_proxy"),
        pytest.param({"HTTPS_PROXY": PROXY}, {}, id="HTTPS_PROXY-is-not-for-http"),
        pytest.param({"HTTP_PROXY": PROXY}, {"trust_env": False}, id="trust_env=False"),
        pytest.param({"HTTP_PROXY": PROXY, "WHISPERR_TRUST_ENV": "0"}, {}, id="WHISPERR_TRUST_ENV"),
    ],
)
async def test_proxy_variables_that_do_not_apply_are_bypassed(
    env: dict[str, str],
    options: dict[str, Any],
    proxy: Proxy,
    server: LocalServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NO_PROXY, a proxy for the other scheme, and trust_env=False: the proxy sees nothing."""
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace(PROXY, proxy.url))
    run = await deliver(server.url, **options)
    assert_stored(server.app, run)
    assert [r["method"] for r in proxy.records(port_of(server.url))] == []


@pytest.mark.parametrize(
    ("env", "use_argument"),
    [
        pytest.param({}, True, id="argument"),
        pytest.param({"WHISPERR_PROXY": PROXY}, False, id="WHISPERR_PROXY"),
        pytest.param({"HTTP_PROXY": DEAD, "ALL_PROXY": DEAD}, True, id="over-HTTP_PROXY"),
        pytest.param({"HTTP_PROXY": DEAD, "NO_PROXY": "*"}, True, id="despite-NO_PROXY"),
    ],
)
async def test_proxy_setting_is_used_for_every_request(
    env: dict[str, str],
    use_argument: bool,
    proxy: Proxy,
    server: LocalServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """proxy= (or WHISPERR_PROXY) sends every request through it and wins over the env."""
    dead = f"http://127.0.0.1:{free_port()}"  # a proxy variable the client must not use
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace(PROXY, proxy.url).replace(DEAD, dead))
    run = await deliver(server.url, **({"proxy": proxy.url} if use_argument else {}))
    assert_stored(server.app, run)
    assert_through_proxy(proxy, server)


def test_sync_client_takes_the_proxy_setting(proxy: Proxy, server: LocalServer) -> None:
    """whisperr.Client(proxy=...) delivers through the proxy too (from its own thread)."""
    client = whisperr.Client(api_key=API_KEY, base_url=server.url, proxy=proxy.url)
    ids = [client.track(f"user_{i}", "plan_upgraded", {"k": i}) for i in range(3)]
    client.close(timeout=10)
    assert sorted(e["context"]["$message_id"] for e in server.app.events) == sorted(ids)
    assert_through_proxy(proxy, server, batches=1)


# -- https through CONNECT, and whom the API key reaches --------------------------------------


@pytest.mark.parametrize("configured", ["environment", "arguments"])
async def test_https_goes_through_a_connect_tunnel(
    configured: str,
    proxy: Proxy,
    tls_server: TlsServer,
    trust: Trust,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY + SSL_CERT_FILE (or proxy= + verify=): a CONNECT tunnel to localhost."""
    options: dict[str, Any] = {}
    if configured == "environment":
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("SSL_CERT_FILE", trust.file)
    else:
        options = {"proxy": proxy.url, "verify": trust.file}
    run = await deliver(tls_server.url, **options)
    assert_stored(tls_server.app, run)
    seen = proxy.records(tls_server.port)
    assert seen, "the proxy saw no CONNECT"
    assert {(r["method"], r["host"]) for r in seen} == {("CONNECT", "localhost")}
    assert len(seen) <= len([r for r in tls_server.app.requests if r.path == BATCH])


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_the_api_key_reaches_the_proxy_only_as_its_header(
    scheme: str, proxy: Proxy, server: LocalServer, tls_server: TlsServer, trust: Trust
) -> None:
    """Plain http: the key is only in X-API-Key; in a tunnel and in the log it is nowhere."""
    url = server.url if scheme == "http" else tls_server.url
    run = await deliver(url, proxy=proxy.url, verify=trust.file)
    assert run.stats.delivered == EVENTS
    seen = proxy.records(port_of(url))
    assert seen
    for record in seen:
        holders = [k.lower() for k, v in record["headers"] if API_KEY in v]
        in_line = API_KEY in f"{record['host']} {record['path']}"
        assert (holders, in_line) == (["x-api-key"] if scheme == "http" else [], False)
    # proxy.py logs a connection's access line when it closes: wait for this run's to be there
    line = f"127.0.0.1:{port_of(url)}/" if scheme == "http" else f"CONNECT localhost:{port_of(url)}"
    with anyio.fail_after(10):
        while line not in (log := proxy.log_file.read_text(encoding="utf-8")):  # noqa: ASYNC110
            await anyio.sleep(0.01)
    leaked = API_KEY in log  # a bool, so that a failure never prints the key
    assert not leaked, "the API key is in the proxy's log"


# -- TLS with a private CA ---------------------------------------------------------------------

FILE, DIR, CONTEXT = "<ca-file>", "<ca-dir>", "<context>"


@pytest.mark.parametrize(
    ("env", "options", "trusted"),
    [
        pytest.param({"SSL_CERT_FILE": FILE}, {}, True, id="SSL_CERT_FILE"),
        pytest.param({"SSL_CERT_DIR": DIR}, {}, True, id="SSL_CERT_DIR"),
        pytest.param({}, {"verify": FILE}, True, id="verify=file"),
        pytest.param({}, {"verify": DIR}, True, id="verify=dir"),
        pytest.param({}, {"verify": CONTEXT}, True, id="verify=context"),
        pytest.param({"WHISPERR_VERIFY": FILE}, {}, True, id="WHISPERR_VERIFY"),
        pytest.param({}, {"verify": False}, True, id="verify=False"),
        pytest.param({}, {}, False, id="default-trust-store"),
        pytest.param({"SSL_CERT_FILE": FILE}, {"trust_env": False}, False, id="trust_env=False"),
        pytest.param(
            {"SSL_CERT_FILE": FILE, "WHISPERR_TRUST_ENV": "false"}, {}, False, id="WHISPERR_TRUST"
        ),
    ],
)
async def test_private_ca_trust(
    env: dict[str, str],
    options: dict[str, Any],
    trusted: bool,
    tls_server: TlsServer,
    trust: Trust,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A private CA's certificate is accepted exactly when trusted (or with verify=False).

    Refused, the handshake fails CERTIFICATE_VERIFY_FAILED: a network error, retried (none
    with max_retries=0) and then dropped at close; the server stores nothing.
    """
    if DIR in {*env.values(), *options.values()} and trust.dir is None:
        pytest.skip("no openssl to name the CA file by its subject hash for a capath directory")
    resolve = {FILE: trust.file, DIR: trust.dir, CONTEXT: trust.context()}
    for name, value in env.items():
        monkeypatch.setenv(name, str(resolve.get(value, value)))
    options = {k: resolve.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    if trusted:
        assert_stored(tls_server.app, await deliver(tls_server.url, **options))
        return
    run = await deliver(tls_server.url, max_retries=0, shutdown_timeout=2, **options)
    assert tls_server.app.events == []
    assert (run.stats.delivered, run.stats.dropped) == (0, EVENTS)
    assert run.stats.dropped_by_reason == {"network_error": EVENTS}
    assert sorted(i for r in run.reports if r.type == "dropped" for i in r.message_ids) == sorted(
        run.ids
    )
    assert any("CERTIFICATE_VERIFY_FAILED" in r.message for r in run.reports)
