"""Running the app under uvicorn: `serve(...)` for `molmoe serve` (signals, graceful shutdown),
`BackgroundServer` for tests and benchmarks (a thread, a free loopback port)."""
from __future__ import annotations

import socket
import threading
import time


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """On SIGINT/SIGTERM the worker stops admitting at once (503), before uvicorn waits
        for the open requests (up to the grace period) and runs the lifespan shutdown, which
        cancels what is still running and joins the engine thread."""

        def handle_exit(self, sig, frame):
            self.config.app.state.worker.drain()
            super().handle_exit(sig, frame)

    return Server


def load_and_create(model_id, options, *, host: str, port: int, dtype: str = "float32",
                    device: str | None = None, backend: str = "reference"):
    """Check the arguments, load the pipeline, build the app (what `molmoe serve` does before
    it listens). Everything the user can get wrong is a MolmoeError before the slow load."""
    from molmoe.backends import select_backend
    from molmoe.errors import UsageError
    from molmoe.pipeline import load_pipeline
    from molmoe.serve.app import create_app

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    try:
        socket.getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host!r}: not an address this machine can bind ({e})") from None
    if options.allow_local_files is not None:
        import pathlib

        if not pathlib.Path(options.allow_local_files).is_dir():
            raise UsageError(f"--allow-local-files {options.allow_local_files}: not a directory")
    _backend, dev = select_backend(backend, device)
    proc, model, eos = load_pipeline(model_id, dtype=dtype, backend=backend, device=str(dev))
    return create_app(proc, model, eos, model_id=str(model_id), options=options)


def _protocol_class(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for every request head: armed when the connection
    opens and again after each response, disarmed once a whole request line and headers have
    arrived. uvicorn alone closes only connections idle after a response (keep-alive); one that
    never sends, or drips its headers a byte at a time, would hold its slot forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request head arrived: its body has body_timeout_s

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return Protocol


def uvicorn_config(app, *, host: str, port: int, log_level: str = "info"):
    import uvicorn

    options = app.state.options
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=options.shutdown_grace_s,
                          limit_concurrency=options.max_connections,
                          http=_protocol_class(options.header_timeout_s),
                          access_log=log_level == "debug")


def serve(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (blocking), then shut down gracefully."""
    try:
        _server_class()(uvicorn_config(app, host=host, port=port, log_level=log_level)).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled: the normal way out
        pass


class BackgroundServer:
    """`with BackgroundServer(app) as s: s.url` - the app on a free loopback port, in a thread."""

    def __init__(self, app, *, host: str = "127.0.0.1", log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = _server_class()(uvicorn_config(app, host=host, port=self.port,
                                                     log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)

    def start(self, timeout_s: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.config.app.state.worker.drain()
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
