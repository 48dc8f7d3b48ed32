"""A real HTTP server on 127.0.0.1, in a thread, with scripted misbehaviour per path."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.trickle_every = 0.25  # seconds between the bytes of /trickle
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

    def route_binary(self, h, hit):  # a body that is not text (here: a gzip header and NULs)
        self.send(h, 200, b"\x1f\x8b\x08\x00" + bytes(range(256)))

    def route_latin1(self, h, hit):  # text, but not UTF-8
        self.send(h, 200, "caf\u00e9 au lait\n".encode("latin-1"))

    def route_empty(self, h, hit):
        self.send(h, 200, b"")

    def route_trickle(self, h, hit):  # one byte at a time: never silent long enough to time out
        h.send_response(200)
        h.send_header("Content-Length", str(len(self.body)))
        h.end_headers()
        try:
            for i in range(len(self.body)):
                h.wfile.write(self.body[i : i + 1])
                h.wfile.flush()
                time.sleep(self.trickle_every)
        except OSError:  # the client gave up
            h.close_connection = True


@contextlib.contextmanager
def serve(body: bytes):
    server = Server(body)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
