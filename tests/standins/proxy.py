"""A forward proxy stand-in: CONNECT tunnels (for https) and absolute-form requests (for http).

It records where each request was going (``targets``), so a test can prove that a client sent
every call through the proxy. Loopback only; one thread per connection; closes cleanly.
"""

from __future__ import annotations

import select
import socket
import socketserver
import threading
from urllib.parse import urlsplit


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        proxy: ProxyStandIn = self.server.owner  # type: ignore[attr-defined]
        request_line = self.rfile.readline(65537).decode("latin-1")
        try:
            method, target, version = request_line.split()
        except ValueError:
            return
        headers = []
        while True:
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            headers.append(line)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            proxy.record(f"CONNECT {target}")
            with socket.create_connection((host, int(port))) as upstream:
                self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self.wfile.flush()
                self._relay(self.connection, upstream, proxy)
            return
        parts = urlsplit(target)
        proxy.record(f"{method} {parts.scheme}://{parts.netloc}")
        with socket.create_connection((parts.hostname, parts.port or 80)) as upstream:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            kept = [h for h in headers if not h.lower().startswith((b"proxy-", b"connection"))]
            length = next((int(h.split(b":", 1)[1]) for h in headers if h.lower().startswith(b"content-length:")), 0)
            upstream.sendall(f"{method} {path} HTTP/1.0\r\n".encode("latin-1") + b"".join(kept)
                             + b"Connection: close\r\n\r\n" + (self.rfile.read(length) if length else b""))
            while chunk := upstream.recv(65536):
                self.wfile.write(chunk)

    @staticmethod
    def _relay(client: socket.socket, upstream: socket.socket, proxy: ProxyStandIn) -> None:
        sockets = [client, upstream]
        while not proxy.closing.is_set():
            readable, _, _ = select.select(sockets, [], [], 0.1)
            for source in readable:
                data = source.recv(65536)
                if not data:
                    return
                (upstream if source is client else client).sendall(data)


class ProxyStandIn:
    """``with ProxyStandIn() as proxy: ... proxy.url ... proxy.targets``"""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, target: str) -> None:
        with self._lock:
            self.targets.append(target)

    def __enter__(self) -> ProxyStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
