"""The runtime around track(): threads, sync code, successive loops, forks and process exit."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import whisperr
from whisperr.server import Fault, LocalServer, create_app

from .conftest import API_KEY, Api


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


def stored_ids(server: LocalServer) -> list[str]:
    return [e["context"]["$message_id"] for e in server.app.events]


def run_script(
    code: str, server: LocalServer, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"WHISPERR_API_KEY": API_KEY, "WHISPERR_BASE_URL": server.url}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.anyio
async def test_track_from_many_threads(settings: dict[str, Any], api: Api) -> None:
    """8 threads x 5,000 track() calls while the loop runs: all 40,000 delivered exactly once."""
    sent: list[list[str]] = [[] for _ in range(8)]

    def work(n: int) -> None:
        for i in range(5000):
            sent[n].append(client.track(f"user_{n}", "thread_event", {"i": i}))

    async with whisperr.AsyncClient(**settings | {"flush_interval": 0.01}) as client:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        with anyio.fail_after(60):
            for thread in threads:
                await anyio.to_thread.run_sync(thread.join)
            await client.flush()
        stats = client.stats()
    delivered = [e["context"]["$message_id"] for e in api.events]
    assert len(delivered) == len(set(delivered)) == 40_000
    assert set(delivered) == {m for ids in sent for m in ids}
    assert (stats.tracked, stats.delivered, stats.dropped) == (40_000, 40_000, 0)


@pytest.mark.anyio
async def test_thread_wakes_an_idle_runner(settings: dict[str, Any], api: Api) -> None:
    """An event tracked from another thread wakes a runner that sleeps with an empty queue."""
    async with whisperr.AsyncClient(**settings, max_batch_size=1) as client:
        await anyio.to_thread.run_sync(client.track, "u", "from_thread")
        with anyio.fail_after(10):
            while not api.events:
                await anyio.lowlevel.checkpoint()
    assert [e["event_type"] for e in api.events] == ["from_thread"]


def test_sync_client_delivers(server: LocalServer) -> None:
    """with whisperr.Client(...) in plain code delivers 10,000 events."""
    with whisperr.Client(api_key=API_KEY, base_url=server.url) as client:
        sent = {client.track("u", "script_event", {"i": i}) for i in range(10_000)}
        client.identify("u", {"plan": "pro"})
    assert set(stored_ids(server)) == sent
    assert len(server.app.events) == 10_000
    assert len(server.app.identifies) == 1
    assert client.stats().delivered == 10_001
    with pytest.raises(whisperr.ClientClosedError):
        client.track("u", "late")


def test_sync_client_flush_and_stats(server: LocalServer) -> None:
    """Client.flush() blocks until delivered; stats() is a consistent snapshot."""
    client = whisperr.Client(api_key=API_KEY, base_url=server.url, flush_interval=60)
    try:
        client.track("u", "a_b")
        result = client.flush(timeout=10)
        assert (result.delivered, result.pending) == (1, 0)
        assert client.stats().delivered == 1
    finally:
        client.close()


def test_flush_after_delivers_a_unit_of_work(server: LocalServer) -> None:
    """flush_after() delivers what a handler tracked before it returns."""
    client = whisperr.Client(api_key=API_KEY, base_url=server.url, flush_interval=60)

    @whisperr.flush_after(client, timeout=5)
    def handler(user: str) -> str:
        return client.track(user, "job_done")

    try:
        message_id = handler("u")
        assert stored_ids(server) == [message_id]
    finally:
        client.close()


@pytest.mark.anyio
async def test_flush_after_async(settings: dict[str, Any], api: Api) -> None:
    """flush_after() on an async function flushes the AsyncClient when it returns."""
    client = whisperr.AsyncClient(**settings)

    @whisperr.flush_after(client, timeout=5)
    async def handler() -> str:
        return client.track("u", "job_done")

    assert [e["context"]["$message_id"] for e in api.events] == []
    message_id = await handler()
    assert [e["context"]["$message_id"] for e in api.events] == [message_id]
    await client.aclose()


def test_flush_after_rejects_a_mismatched_client(settings: dict[str, Any]) -> None:
    """A sync function with an AsyncClient is refused at decoration time."""
    with pytest.raises(TypeError, match=r"whisperr\.Client"):
        whisperr.flush_after(whisperr.AsyncClient(**settings))(lambda: None)


def test_script_that_forgets_to_close_still_delivers(server: LocalServer) -> None:
    """A process that exits without close() delivers what is queued from its atexit hook."""
    result = run_script(
        """
        import whisperr
        client = whisperr.Client(whisperr.Settings.from_env(flush_interval=60))
        for i in range(1000):
            client.track("u", "forgotten", {"i": i})
        """,
        server,
    )
    assert result.returncode == 0, result.stderr
    assert len(set(stored_ids(server))) == 1000


def test_exit_delivery_resolves_host_names(server: LocalServer) -> None:
    """At exit no executor thread may start for DNS; a base_url with a host name still works."""
    result = run_script(
        f"""
        import whisperr
        client = whisperr.Client(base_url="{server.url.replace("127.0.0.1", "localhost")}",
                                 flush_interval=60)
        for i in range(3):
            client.track("u", "at_exit", {{"i": i}})
        """,
        server,
    )
    assert result.returncode == 0, result.stderr
    assert len(set(stored_ids(server))) == 3, result.stderr


def test_exit_never_hangs_on_an_unreachable_server() -> None:
    """With the server down, a process exits within its shutdown budget, reporting the loss."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"""
        import whisperr
        client = whisperr.Client(api_key="{API_KEY}", base_url="http://127.0.0.1:{port}",
                                 shutdown_timeout=1.0, backoff_base=0.05)
        client.track("u", "lost")
        """
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert time.monotonic() - started < 10
    assert "not delivered before the client closed" in result.stderr
    assert API_KEY not in result.stderr + result.stdout


def test_module_api_across_two_asyncio_runs(api: Api) -> None:
    """The module-level client used in two consecutive asyncio.run() calls delivers both."""
    whisperr.init(api_key=API_KEY, transport=api.transport(), flush_interval=60)
    sent: list[str] = []

    async def first() -> None:
        sent.append(whisperr.track("u", "first_run"))

    async def second() -> None:
        sent.append(whisperr.track("u", "second_run"))
        await whisperr.flush()
        await whisperr.shutdown()

    asyncio.run(first())
    asyncio.run(second())
    assert [e["context"]["$message_id"] for e in api.events] == sent
    assert [e["event_type"] for e in api.events] == ["first_run", "second_run"]


def test_async_client_outlives_a_closed_loop(api: Api) -> None:
    """A client whose loop was closed under it rebinds to the next loop and keeps working."""
    client = whisperr.AsyncClient(api_key=API_KEY, transport=api.transport(), flush_interval=60)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0, client.track("u", "one")))
    loop.close()  # the runner task was never cancelled: the loop just went away

    async def later() -> None:
        client.track("u", "two")
        await client.aclose()

    asyncio.run(later())
    assert [e["event_type"] for e in api.events] == ["one", "two"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_clean(server: LocalServer) -> None:
    """A forked child delivers its own events; the parent's are delivered once, by the parent."""
    result = run_script(
        """
        import os, warnings, whisperr
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with a thread running
        client = whisperr.Client(whisperr.Settings.from_env(flush_interval=60))
        parent = [client.track("u", "in_parent") for _ in range(100)]
        pid = os.fork()
        if pid == 0:
            child = [client.track("u", "in_child") for _ in range(50)]
            client.close()
            print("child", client.stats().delivered, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        client.close()
        print("parent", client.stats().delivered, flush=True)
        """,
        server,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")[:2]) == ["child 50", "parent 100"]
    types = [e["event_type"] for e in server.app.events]
    assert (types.count("in_parent"), types.count("in_child")) == (100, 50)
    assert len(set(stored_ids(server))) == 150


@pytest.mark.anyio
async def test_first_track_from_a_thread_starts_delivery(api: Api) -> None:
    """A client made in a loop delivers a track() from a worker thread before any loop use."""
    whisperr.init(api_key=API_KEY, transport=api.transport(), flush_interval=0.01)
    try:
        await anyio.to_thread.run_sync(whisperr.track, "u", "from_sync_route")
        with anyio.fail_after(10):
            while not api.events:
                await anyio.lowlevel.checkpoint()
    finally:
        await whisperr.shutdown()
    assert [e["event_type"] for e in api.events] == ["from_sync_route"]


def test_sync_client_stats_from_the_error_hook(server: LocalServer) -> None:
    """Client.stats() called from the on_error hook (on the loop thread) does not deadlock."""
    seen: list[int] = []
    server.app.faults.script([Fault.status(400)])

    def hook(report: whisperr.DeliveryReport) -> None:
        seen.append(client.stats().dropped)

    client = whisperr.Client(api_key=API_KEY, base_url=server.url, on_error=hook)
    try:
        client.track("u", "rejected_once")
        result = client.flush(timeout=5)
    finally:
        client.close()
    assert (seen, result.timed_out) == ([1], False)
