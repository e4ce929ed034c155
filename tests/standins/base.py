"""Common machinery for the loopback stand-in servers.

Why this shape:

* A ``ThreadingHTTPServer`` on 127.0.0.1 port 0 in daemon threads lets the
  real ``requests``/``msal``/``pymisp`` stacks talk to us over real sockets.
* Handlers speak HTTP/1.0: one request per connection, so ``close()`` never
  waits on a keep-alive socket and small writes do not hit delayed-ACK stalls.
* With TLS the handshake runs in the per-connection thread (the listening
  socket wraps accepted sockets lazily), so a client that rejects our
  certificate cannot stall the accept loop.
* Every request is logged (``Recorded``) and any exception inside a handler
  lands in ``errors``; fixtures assert ``errors == []`` at teardown so a bug
  in a stand-in cannot hide behind a client-side retry.
* ``inject``/``after`` give every stand-in the same fault-injection knobs.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from tests.standins.tls import PKI

JSON_TYPE = "application/json; charset=utf-8"
_S = TypeVar("_S", bound="StandIn")


@dataclass
class Recorded:
    """One request as the stand-in saw it, plus the status it answered.

    ``headers`` keys are lower-cased so assertions need not guess the casing a
    client used. ``body`` is parsed JSON, a form dict (last value wins) or the
    raw bytes. ``status`` is 0 for a dropped connection (and while a ``match``
    predicate is being evaluated). ``t`` is ``time.monotonic()`` at arrival.
    """

    endpoint: str
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int
    t: float


@dataclass
class Request:
    """What a route handler receives."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    raw: bytes
    params: dict[str, str]
    recorded: Recorded


@dataclass
class Response:
    """What a route handler returns; dict/list bodies are sent as JSON."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    endpoint: str
    handler: Callable[[Request], Response]


@dataclass
class _Fault:
    endpoint: str
    status: int | None
    retry_after: int | float | str | None
    body: Any
    drop: bool
    delay: float
    times: int
    skip: int
    match: Callable[[Recorded], bool] | None


@dataclass
class _Hook:
    endpoint: str
    nth: int
    fn: Callable[[], Any]
    fired: bool = False


def route(method: str, pattern: str, endpoint: str, handler: Callable[[Request], Response]) -> Route:
    """Build a Route whose pattern must match the whole path."""
    return Route(method, re.compile(pattern + r"\Z"), endpoint, handler)


def json_response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Response:
    return Response(status, body, dict(headers or {}))


def parse_body(raw: bytes, content_type: str) -> Any:
    """Parse JSON or form bodies; fall back to the raw bytes (kept for asserts)."""
    if not raw:
        return None
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        return {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _encode(resp: Response) -> bytes:
    if resp.body is None:
        return b""
    if isinstance(resp.body, bytes):
        return resp.body
    if isinstance(resp.body, str):
        return resp.body.encode("utf-8")
    return json.dumps(resp.body).encode("utf-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins every handler thread

    def __init__(self, standin: StandIn, context: ssl.SSLContext | None) -> None:
        self.standin = standin
        self.ssl_context = context
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.standin._record_error(sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    timeout = 15
    server: _Server

    def setup(self) -> None:
        self._tls_failed = False
        sock = self.request
        sock.settimeout(self.timeout)
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self._tls_failed = True
                self.server.standin._record_handshake_failure(exc)
        super().setup()

    def handle(self) -> None:
        if not self._tls_failed:
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Silence the default stderr access log; the request log replaces it."""

    def do_GET(self) -> None:
        self.server.standin._dispatch(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET


class StandIn:
    """Base class: lifecycle, request log, fault injection and hooks.

    Subclasses implement ``routes()`` and may override ``fault_body`` (the
    error body used for injected statuses), ``on_arrival`` and ``on_answer``.
    """

    name = "standin"

    def __init__(self, pki: PKI | None = None) -> None:
        self.pki = pki
        self.errors: list[BaseException | str] = []
        # Handshakes the *client* aborted (it rejected our cert, or connected and
        # hung up). That is legitimate client behaviour, so it is not an error.
        self.tls_rejections: list[str] = []
        self.log: list[Recorded] = []
        self._lock = threading.RLock()
        self._faults: list[_Fault] = []
        self._hooks: list[_Hook] = []
        self._ok_counts: Counter[str] = Counter()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[Route] = []

    # ----------------------------------------------------------------- lifecycle
    def routes(self) -> Iterable[Route]:
        raise NotImplementedError

    def start(self: _S) -> _S:
        """Bind a free port and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        self._routes = list(self.routes())
        context = self.pki.server_context() if self.pki else None
        self._closing.clear()
        self._server = _Server(self, context)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and join every thread; the port then refuses connections."""
        if self._server is None:
            return
        self._closing.set()  # wakes handlers sleeping in a delay/latency
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``https://127.0.0.1:PORT``."""
        scheme = "https" if self.pki else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ the log
    def calls(self, endpoint: str | None = None, status: int | None = None) -> list[Recorded]:
        """Logged requests, optionally restricted to one endpoint and/or status."""
        with self._lock:
            return [
                r
                for r in self.log
                if (endpoint is None or r.endpoint == endpoint) and (status is None or r.status == status)
            ]

    # ----------------------------------------------------------- fault knobs
    def inject(
        self,
        endpoint: str,
        *,
        status: int | None = None,
        retry_after: int | float | str | None = None,
        body: Any = None,
        drop: bool = False,
        delay: float = 0.0,
        times: int = 1,
        skip: int = 0,
        match: Callable[[Recorded], bool] | None = None,
    ) -> None:
        """Fault the next ``times`` requests to ``endpoint`` (after ``skip`` of them).

        Only requests for which ``match(recorded)`` is true count (when given).
        ``delay`` sleeps first; then ``drop`` closes the socket without a reply,
        ``status`` answers with that status (``body`` or ``fault_body``), and
        with neither the request is handled normally after the delay.
        """
        if not (drop or status or delay):
            raise ValueError("inject needs status, drop or delay")
        with self._lock:
            self._faults.append(_Fault(endpoint, status, retry_after, body, drop, delay, times, skip, match))

    def reset_faults(self) -> None:
        """Forget every injected fault and pending hook (between the runs of one test)."""
        with self._lock:
            self._faults.clear()
            self._hooks.clear()

    def ok_count(self, endpoint: str) -> int:
        """How many 2xx answers ``endpoint`` has given so far (``after`` counts the same way)."""
        with self._lock:
            return self._ok_counts[endpoint]

    def after(self, endpoint: str, nth: int, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` once, right after the ``nth`` 2xx answer on ``endpoint``."""
        with self._lock:
            self._hooks.append(_Hook(endpoint, nth, fn))

    def fault_body(self, recorded: Recorded, status: int) -> Any:
        """Error body for an injected status when the test gave none."""
        return {"error": {"code": HTTPStatus(status).phrase.replace(" ", ""), "message": HTTPStatus(status).phrase}}

    def on_arrival(self, recorded: Recorded) -> None:
        """Hook: called for every request before faults and handlers run."""

    def on_answer(self, recorded: Recorded, response: Response) -> None:
        """Hook: called with the final response before it is written."""

    # ---------------------------------------------------------------- internals
    def _record_error(self, exc: BaseException | str | None) -> None:
        with self._lock:
            self.errors.append(exc if exc is not None else "unknown error")

    def _record_handshake_failure(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        client_side = (
            isinstance(exc, ssl.SSLEOFError | ConnectionError | TimeoutError)
            or "ALERT" in text.upper()
            or "EOF" in text.upper()
        )
        if client_side:
            with self._lock:
                self.tls_rejections.append(text)
        else:
            self._record_error(exc)

    def _match_route(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """Return (route, params, path_known); path_known distinguishes 405 from 404."""
        path_known = False
        for r in self._routes:
            m = r.pattern.match(path)
            if m:
                path_known = True
                if r.method == method:
                    return r, m.groupdict(), True
        return None, {}, path_known

    def _take_fault(self, rec: Recorded) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint != rec.endpoint:
                    continue
                if fault.match is not None:
                    try:
                        if not fault.match(rec):
                            continue
                    except Exception as exc:  # a broken predicate is a test bug: surface it
                        self._record_error(exc)
                        continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _dispatch(self, h: _Handler) -> None:
        t = time.monotonic()
        split = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in h.headers.items()}
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            length = 0
        raw = h.rfile.read(length) if length > 0 else b""
        body = parse_body(raw, headers.get("content-type", ""))
        rt, params, path_known = self._match_route(h.command, split.path)
        endpoint = rt.endpoint if rt else "unknown"
        rec = Recorded(endpoint, h.command, split.path, query, headers, body, 0, t)

        try:
            self.on_arrival(rec)
        except Exception as exc:
            self._record_error(exc)
        fault = self._take_fault(rec)
        resp: Response | None = None
        if fault is not None:
            if fault.delay:
                self._closing.wait(fault.delay)
            if fault.drop:
                with self._lock:
                    self.log.append(rec)  # status stays 0
                h.close_connection = True
                return
            if fault.status:
                fbody = fault.body if fault.body is not None else self.fault_body(rec, fault.status)
                resp = Response(fault.status, fbody)
                if fault.retry_after is not None:
                    resp.headers["Retry-After"] = str(fault.retry_after)
        if resp is None:
            if rt is None:
                resp = self._not_routed(rec, path_known)
            else:
                req = Request(h.command, split.path, query, headers, body, raw, params, rec)
                try:
                    resp = rt.handler(req)
                except Exception:
                    self._record_error(traceback.format_exc())
                    resp = Response(500, self.fault_body(rec, 500))
        try:
            self.on_answer(rec, resp)
        except Exception as exc:
            self._record_error(exc)

        rec.status = resp.status
        with self._lock:
            self.log.append(rec)
            nth = 0
            if 200 <= resp.status < 300:
                self._ok_counts[endpoint] += 1
                nth = self._ok_counts[endpoint]
        self._write(h, resp)
        if nth:
            self._run_hooks(endpoint, nth)

    def _not_routed(self, rec: Recorded, path_known: bool) -> Response:
        status = 405 if path_known else 404
        return Response(status, self.fault_body(rec, status))

    def _write(self, h: _Handler, resp: Response) -> None:
        data = b"" if resp.status in (204, 304) or h.command == "HEAD" else _encode(resp)
        try:
            h.send_response(resp.status)
            for name, value in resp.headers.items():
                h.send_header(name, value)
            if resp.status not in (204, 304):
                h.send_header("Content-Type", resp.content_type)
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if data:
                h.wfile.write(data)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            pass  # the client went away (e.g. its own timeout); nothing to answer

    def _run_hooks(self, endpoint: str, nth: int) -> None:
        with self._lock:
            due = [hk for hk in self._hooks if hk.endpoint == endpoint and hk.nth == nth and not hk.fired]
            for hk in due:
                hk.fired = True
        for hk in due:
            try:
                hk.fn()
            except Exception:
                self._record_error(traceback.format_exc())
