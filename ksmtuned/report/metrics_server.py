"""The /metrics endpoint: a small HTTP server whose every resource is bounded.

prometheus_client's own ``start_http_server`` gives every connection a thread and waits for its
request line without a deadline: a few dozen stalled clients (or one slowloris sending a header
byte now and then) held as many threads, and grew the daemon by hundreds of MB.  This server is
one thread and one selector: at most MAX_CONNECTIONS connections at once (a new one pushes out
the one held longest, so stalled clients cannot lock a real scrape out), each with one deadline
from accept to the last byte sent (DEADLINE_S: a slow client is cut off however it trickles),
a request of at most REQUEST_LIMIT_BYTES, and a body rendered by prometheus_client's
``generate_latest``.  It reads only the last tick's numbers (the collector), never the kernel,
and the adjust loop never waits for it.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16
REQUEST_LIMIT_BYTES = 8192
DEADLINE_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # prometheus_client's CONTENT_TYPE_LATEST
PATHS = ("/metrics", "/")


class _Conn:
    __slots__ = ("deadline", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.inbuf = bytearray()
        self.outbuf: memoryview | None = None


def _response(status: str, body: bytes, head_only: bool = False, content_type: str = CONTENT_TYPE) -> bytes:
    header = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
              "Connection: close\r\n\r\n").encode()
    return header if head_only else header + body


def answer(request: bytes, render: Callable[[], bytes]) -> bytes:
    """The whole response to one request's head (request line and headers)."""
    line = request.split(b"\n", 1)[0].strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", b"bad request\n", content_type="text/plain")
    method, target = parts[0], parts[1].split(b"?", 1)[0].decode("ascii", "replace")
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"GET only\n", content_type="text/plain")
    if target not in PATHS:
        return _response("404 Not Found", b"see /metrics\n", content_type="text/plain")
    try:
        body = render()
    except Exception:
        log.exception("rendering the metrics failed")
        return _response("500 Internal Server Error", b"error\n", content_type="text/plain")
    return _response("200 OK", body, head_only=method == b"HEAD")


class MetricsServer:
    """Serves ``render()`` on ``(host, port)`` from one thread until :meth:`shutdown`."""

    def __init__(self, host: str, port: int, render: Callable[[], bytes], max_connections: int = MAX_CONNECTIONS,
                 deadline_s: float = DEADLINE_S, request_limit_bytes: int = REQUEST_LIMIT_BYTES):
        self.render = render
        self.max_connections = max_connections
        self.deadline_s = deadline_s
        self.request_limit_bytes = request_limit_bytes
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        self.sock = socket.socket(family, type_, proto)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(addr)
            self.sock.listen(64)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.server_address = self.sock.getsockname()[:2]
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if hasattr(os, "pipe2") else os.pipe()
        self._conns: dict[int, _Conn] = {}
        self._thread = threading.Thread(target=self._serve, name="ksmtuned-metrics", daemon=True)
        self._thread.start()

    # -- the loop --
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                now = time.monotonic()
                timeout = min((c.deadline for c in self._conns.values()), default=now + 60) - now
                for key, events in sel.select(max(0.0, timeout)):
                    if key.fileobj == self._wake_r:
                        return
                    if key.fileobj is self.sock:
                        self._accept(sel)
                        continue
                    conn = self._conns.get(key.fd)
                    if conn is None:
                        continue
                    if events & selectors.EVENT_READ and conn.outbuf is None:
                        self._read(sel, conn)
                    elif events & selectors.EVENT_WRITE and conn.outbuf is not None:
                        self._write(sel, conn)
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if c.deadline <= now]:
                    self._close(sel, conn)  # too slow: cut off
        except Exception:
            log.exception("the metrics server stopped")
        finally:
            for conn in list(self._conns.values()):
                self._close(sel, conn)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(64):  # then let the connections already held have their turn
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: drop this round, try again next
                log.debug("metrics accept failed: %s", e)
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_connections:
                self._close(sel, min(self._conns.values(), key=lambda c: c.deadline))  # held longest
            conn = _Conn(sock, time.monotonic() + self.deadline_s)
            self._conns[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ)

    def _read(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(sel, conn)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbuf.find(b"\n\n")
        if end < 0:
            if len(conn.inbuf) > self.request_limit_bytes:
                self._reply(sel, conn, _response("431 Request Header Fields Too Large", b"too large\n",
                                                 content_type="text/plain"))
            return
        self._reply(sel, conn, answer(bytes(conn.inbuf[:end]), self.render))

    def _reply(self, sel: selectors.BaseSelector, conn: _Conn, data: bytes) -> None:
        conn.inbuf = bytearray()
        conn.outbuf = memoryview(data)
        sel.modify(conn.sock, selectors.EVENT_WRITE)
        self._write(sel, conn)

    def _write(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        assert conn.outbuf is not None
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(sel, conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._close(sel, conn)

    def _close(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # -- control (from the daemon's thread) --
    def shutdown(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(5)

    def server_close(self) -> None:
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
