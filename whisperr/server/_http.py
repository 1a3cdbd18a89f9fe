"""A small HTTP/1.1 server for ASGI apps (asyncio streams + h11) and a background-thread runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol, final
from urllib.parse import unquote

import h11

from whisperr.server._app import Message, Receive, Scope, Send, WhisperrApp, create_app
from whisperr.server._faults import DropConnection

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 32 * 1024 * 1024  # bodies above this get a 413 before the app sees them
_READ_SIZE = 64 * 1024
logger = logging.getLogger("whisperr.server")


class ASGIApp(Protocol):
    """Any ASGI 3 application."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


async def serve(
    app: ASGIApp,
    *,
    stop: asyncio.Event,
    host: str = DEFAULT_HOST,
    port: int = 0,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve `app` over HTTP/1.1 until `stop` is set, then close every connection.

    Args:
        app: The ASGI app; it may raise `DropConnection` to hang up without answering.
        stop: Set it to shut down.
        host: The address to bind; loopback unless you mean otherwise.
        port: The port to bind; 0 picks a free one.
        on_ready: Called with the base URL (`http://127.0.0.1:54321`) once listening.
    """
    connections: set[asyncio.Task[object]] = set()
    handlers: set[asyncio.Task[object]] = set()  # the streams' callbacks, each awaiting one

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The connection runs in its own task so that stopping can cancel it while this
        # callback still ends normally (asyncio 3.11 logs callbacks that end cancelled, and
        # 3.12.1 logs a traceback for one cancelled).
        handler = asyncio.current_task()
        if handler is not None:
            handlers.add(handler)
            handler.add_done_callback(handlers.discard)
        task = asyncio.create_task(_Connection(app, reader, writer).run())
        connections.add(task)
        task.add_done_callback(connections.discard)
        await asyncio.wait([task])
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("a connection failed", exc_info=exc)

    server = await asyncio.start_server(handle, host, port, backlog=1024)
    try:
        if on_ready is not None:
            on_ready(_url(server))
        await stop.wait()
    finally:
        server.close()
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        # Let the callbacks end on their own (their connection ended), before the loop's own
        # clean-up would cancel them.
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@final
class LocalServer:
    """Runs a `WhisperrApp` on 127.0.0.1 in a background thread with its own event loop.

    Use it as a context manager: `with LocalServer() as server: ... server.url ...`.
    """

    def __init__(
        self,
        app: WhisperrApp | None = None,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        timeout: float = 5.0,
    ) -> None:
        """Prepare (not start) a server.

        Args:
            app: The app to serve; a fresh `create_app()` by default.
            host: The address to bind.
            port: The port to bind; 0 (the default) picks a free one.
            timeout: Seconds to wait for the server to start, and to stop.
        """
        self.app = create_app() if app is None else app
        self._host, self._port, self._timeout = host, port, timeout
        self._url: str | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: Exception | None = None

    def __repr__(self) -> str:
        return f"<LocalServer {self._url or 'stopped'}>"

    @property
    def url(self) -> str:
        """The base URL, like `http://127.0.0.1:54321`."""
        if self._url is None:
            raise RuntimeError("the server is not running")
        return self._url

    def start(self) -> LocalServer:
        """Start serving in a background thread; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("a LocalServer can only be started once")
        self._thread = threading.Thread(target=self._run, name="whisperr-server", daemon=True)
        self._thread.start()
        started = self._ready.wait(self._timeout)
        if not started or self._failure is not None:
            self.stop()
            raise RuntimeError("the local server failed to start") from self._failure
        return self

    def stop(self) -> None:
        """Stop serving and join the thread (waiting at most `timeout` seconds)."""
        loop, stop, self._url = self._loop, self._stop, None
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(self._timeout)
            if self._thread.is_alive():
                logger.warning("the local server did not stop within %.1f s", self._timeout)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as exc:  # reported to the starting thread by start()
            self._failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        await serve(self.app, stop=self._stop, host=self._host, port=self._port, on_ready=self._up)

    def _up(self, url: str) -> None:
        self._url = url
        self._ready.set()


class _Connection:
    """One client connection: parse requests with h11, run the app, write its answers."""

    def __init__(
        self, app: ASGIApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._app, self._reader, self._writer = app, reader, writer
        self._h11 = h11.Connection(h11.SERVER)
        self._started = self._complete = False

    async def run(self) -> None:
        try:
            while await self._serve_one():
                self._h11.start_next_cycle()
        except h11.RemoteProtocolError:
            await self._answer_plain(400)
        except (DropConnection, ConnectionError):
            pass  # hanging up (on purpose or because the client did) is how a connection ends
        finally:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    async def _serve_one(self) -> bool:
        request = await self._next_event()
        if not isinstance(request, h11.Request):
            return False  # the client closed an idle connection
        body = await self._read_body()
        if body is None:
            await self._answer_plain(413)
            return False
        self._started = self._complete = False
        await self._call_app(request, body)
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    async def _next_event(self) -> object:
        while (event := self._h11.next_event()) is h11.NEED_DATA:
            if self._h11.they_are_waiting_for_100_continue:
                await self._write(h11.InformationalResponse(status_code=100, headers=[]))
            self._h11.receive_data(await self._reader.read(_READ_SIZE))
        return event

    async def _read_body(self) -> bytes | None:
        body = bytearray()
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
            if len(body) > MAX_BODY_BYTES:
                return None
        return bytes(body)

    async def _call_app(self, request: h11.Request, body: bytes) -> None:
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            return pending.pop() if pending else await self._wait_for_disconnect()

        try:
            await self._app(self._scope(request), receive, self._send)
        except DropConnection:
            raise
        except Exception:
            logger.exception("the ASGI app failed on %s", request.target.decode("latin-1"))
        if not self._started:
            await self._answer_plain(500)
        elif not self._complete:
            raise DropConnection("the app did not finish its response")

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            await self._write(h11.Response(status_code=message["status"], headers=headers))
            self._started = True
        elif message["type"] == "http.response.body" and self._started and not self._complete:
            self._complete = not message.get("more_body", False)
            body = h11.Data(data=message.get("body", b""))
            await self._write(body, *([h11.EndOfMessage()] if self._complete else []))
        else:
            raise RuntimeError(f"unexpected ASGI message {message['type']!r}")

    async def _wait_for_disconnect(self) -> Message:
        while data := await self._reader.read(_READ_SIZE):
            self._h11.receive_data(data)  # pipelined bytes wait in h11's buffer
        return {"type": "http.disconnect"}

    async def _answer_plain(self, status: int) -> None:
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [(b"content-length", b"0"), (b"connection", b"close")]
        with contextlib.suppress(ConnectionError, h11.LocalProtocolError):
            await self._write(h11.Response(status_code=status, headers=headers), h11.EndOfMessage())
        self._started = self._complete = True

    async def _write(self, *events: h11.Event) -> None:
        self._writer.write(b"".join(self._h11.send(event) or b"" for event in events))
        await self._writer.drain()

    def _scope(self, request: h11.Request) -> Scope:
        path, _, query = request.target.partition(b"?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "client": self._writer.get_extra_info("peername"),
            "server": self._writer.get_extra_info("sockname"),
        }


def _url(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
