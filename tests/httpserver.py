"""A real HTTP server on 127.0.0.1, in a thread, with scripted misbehaviour per path."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                getattr(server, "route_" + self.path.strip("/").replace("-", "_"), server.route_missing)(
                    self, server.hits[self.path]
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def send(handler, status: int, body: bytes, length: int | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()

    def route_ok(self, h, hit):
        self.send(h, 200, self.body)

    def route_missing(self, h, hit):
        self.send(h, 404, b"not found")

    def route_flaky(self, h, hit):  # 500 once, then fine
        self.send(h, 500, b"oops") if hit == 1 else self.send(h, 200, self.body)

    def route_always_500(self, h, hit):
        self.send(h, 503, b"unavailable")

    def route_drop_once(self, h, hit):  # connection dropped mid-body on the first try
        if hit == 1:
            self.send(h, 200, self.body[: len(self.body) // 2], length=len(self.body))
            h.close_connection = True
        else:
            self.send(h, 200, self.body)

    def route_short(self, h, hit):  # Content-Length always longer than the body
        self.send(h, 200, self.body[:-10], length=len(self.body))
        h.close_connection = True

    def route_corrupt(self, h, hit):
        self.send(h, 200, self.body.replace(b"e", b"E"))


@contextlib.contextmanager
def serve(body: bytes):
    server = Server(body)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
