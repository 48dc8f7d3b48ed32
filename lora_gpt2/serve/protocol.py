"""The HTTP connection below the routes: uvicorn's h11 protocol, with every error a client can
meet there in OpenAI's JSON shape, a bound on the header block (431), and a timeout on headers
as on bodies (408), each closing the connection.

A route's errors are app.py's; these are the ones no route sees: a malformed request line or
`Content-Length`, headers larger than `MAX_HEADER_BYTES`, and headers trickled slower than the
body timeout.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .request import ApiError

MAX_HEADER_BYTES = 32 * 1024  # the request line and headers together: one header of 100 kB gets 431
MAX_HEADERS = 100  # an OpenAI client sends about 15: 2,000 headers get 431


CLOSE_AFTER_S = 1.0  # after an error reply the write side closes at once, the socket this much later


def _respond(protocol: H11Protocol, error: ApiError) -> None:
    """Write `error` as the whole response and close the connection (whatever state h11 is in).

    The write side closes first (FIN), so the client reads the reply; closing the socket at once
    while the client still sends would reset the connection and lose the reply in flight."""
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
    transport = protocol.transport
    if transport.is_closing():
        return
    transport.pause_reading()
    transport.write(head.encode() + body)
    if transport.can_write_eof():
        transport.write_eof()
    protocol.loop.call_later(CLOSE_AFTER_S, transport.close)


class ApiProtocol(H11Protocol):
    """H11Protocol whose protocol-level refusals speak OpenAI's error shape."""

    header_timeout_s: float = 30.0  # set per server by `server_config`

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._error: h11.RemoteProtocolError | None = None
        self._header_timer = None
        self._head = bytearray()  # the header block so far (at most MAX_HEADER_BYTES + 4 bytes)
        real_next_event = self.conn.next_event

        def next_event():  # remember why h11 refused, for send_400_response (which is not told)
            try:
                return real_next_event()
            except h11.RemoteProtocolError as exc:
                self._error = exc
                raise

        self.conn.next_event = next_event

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a request's headers are due
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)
            # h11 bounds only a header block that arrives in pieces: count the whole one here
            self._head += data[: MAX_HEADER_BYTES + 4 - len(self._head)]
            end = self._head.find(b"\r\n\r\n")
            lines = self._head.count(b"\r\n", 0, end if end >= 0 else len(self._head))  # the request line + headers
            if end > MAX_HEADER_BYTES or (end < 0 and len(self._head) > MAX_HEADER_BYTES) or lines > MAX_HEADERS:
                self._error = h11.RemoteProtocolError("headers too large", error_status_hint=431)
                self.send_400_response("")
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._stop_header_timer()
            self._head.clear()

    def connection_lost(self, exc) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE:
            _respond(self, ApiError(408, f"the request headers took more than {self.header_timeout_s:g} s to arrive",
                                    code="request_timeout"))

    def send_400_response(self, msg: str) -> None:
        status = getattr(self._error, "error_status_hint", 400) or 400
        if status == 431:
            error = ApiError(431, f"the request's headers are more than {MAX_HEADER_BYTES:,} bytes or more than "
                             f"{MAX_HEADERS} headers", code="headers_too_large")
        else:
            reason = " ".join(str(self._error or msg).split())[:200]
            error = ApiError(400, f"the request is not valid HTTP ({reason})", code="invalid_http")
        self._stop_header_timer()
        _respond(self, error)


def server_config(app, host: str, port: int, timeout_s: float) -> uvicorn.Config:
    """uvicorn's settings for `serve`: the h11 protocol above, headers bounded and timed out as
    bodies are (`timeout_s`)."""
    protocol = type("ServeProtocol", (ApiProtocol,), {"header_timeout_s": timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=protocol,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)
