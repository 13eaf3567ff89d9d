"""``StoreProxy``: an S3 endpoint on loopback in front of the moto server that injects a store's faults
and latency, for the tests and benchmarks that need a store that misbehaves or is far away."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StoreProxy:
    """An S3 endpoint on loopback that forwards to moto and injects faults.

    ``mode``: ``ok`` forwards; ``flaky`` answers every third request with 503 SlowDown (throttling);
    ``down`` drops every connection without an answer (the store is gone). ``deny`` maps a path
    substring to a method whose requests get 403 AccessDenied. ``hold(method, part)`` keeps the next
    matching requests waiting until ``release()``; ``arrived`` is set when one is waiting. ``delay``:
    seconds every request waits before it is forwarded (a distant store's latency)."""

    def __init__(self, upstream: str, delay: float = 0.0):
        self.upstream = upstream.removeprefix("http://")
        self.delay = delay
        self.mode = "ok"
        self.deny: dict[str, str] = {}
        self.log: list[tuple[str, str, int | None]] = []    # method, path, status (None: dropped)
        self._hold: tuple[str, str] | None = None
        self._gate = threading.Event()
        self.arrived = threading.Event()
        self._lock = threading.Lock()
        self._count = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None   # clients that gave up hang up on us
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # polled every 50 ms, not 0.5 s: stop() waits for the next poll
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def hold(self, method: str, part: str) -> None:
        self._gate.clear()
        self.arrived.clear()
        self._hold = (method, part)

    def release(self) -> None:
        self._hold = None
        self._gate.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def statuses(self, method: str, part: str) -> list[int | None]:
        """What the proxy answered to ``method`` requests whose path holds ``part``."""
        return [s for m, p, s in list(self.log) if m == method and part in p]

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward()

            do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.delay:
                    time.sleep(proxy.delay)
                if proxy._hold and self.command == proxy._hold[0] and proxy._hold[1] in self.path:
                    proxy.arrived.set()
                    proxy._gate.wait(timeout=120)
                with proxy._lock:
                    proxy._count += 1
                    throttled = proxy.mode == "flaky" and proxy._count % 3 == 0
                denied = any(part in self.path and method == self.command for part, method in proxy.deny.items())
                if proxy.mode == "down":
                    proxy.log.append((self.command, self.path, None))
                    self.close_connection = True
                    return
                if throttled:
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if denied:
                    return self._error(403, "AccessDenied", "Access Denied")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                reply, data = self._upstream(headers, body)
                self._reply(reply.status, [(k, v) for k, v in reply.getheaders()
                                           if k.lower() not in ("connection", "transfer-encoding", "content-length")
                                           or (k.lower() == "content-length" and self.command == "HEAD")], data)

            def _upstream(self, headers: dict, body: bytes):
                """Forward on this client connection's own connection to moto, kept open between requests (a
                connection per request would cost both servers a thread and a handshake each time)."""
                for attempt in (1, 2):
                    if getattr(self, "_conn", None) is None:
                        self._conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                    try:
                        self._conn.request(self.command, self.path, body=body, headers=headers)
                        reply = self._conn.getresponse()
                        return reply, reply.read()
                    except (http.client.HTTPException, ConnectionError):
                        self._conn.close()
                        self._conn = None       # moto closed a kept connection: one new try
                        if attempt == 2:
                            raise

            def _error(self, status: int, code: str, message: str):
                xml = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
                self._reply(status, [("Content-Type", "application/xml")], xml.encode())

            def _reply(self, status: int, headers: list, data: bytes):
                proxy.log.append((self.command, self.path, status))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
