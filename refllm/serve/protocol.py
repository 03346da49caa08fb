"""uvicorn's h11 HTTP/1.1 protocol with a header read timeout (issue 14, D8).

uvicorn closes a connection idle between requests after `timeout_keep_alive`, but
once a client has sent the first bytes of a request it waits for the rest of the
request line and headers for ever: a client that trickles them in (slowloris) holds
a connection and its buffers as long as it likes. Here a timer starts when a
connection opens, and again when the first bytes of a later request arrive on it;
it stops when h11 has the whole head (the client's state leaves IDLE). If it fires
first, the client gets a 408 and the connection is closed, as nginx's
`client_header_timeout` does. (The body has its own deadline: `bodies.read_body`.)
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .bodies import dumps


def h11_with_header_timeout(timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class whose request heads must arrive within `timeout_s` seconds."""

    class H11WithHeaderTimeout(H11Protocol):
        header_timeout_s = timeout_s
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()  # (part of) a request head, not complete yet
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            body = dumps({"error": f"the request line and headers did not arrive within {self.header_timeout_s:g} s"})
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return H11WithHeaderTimeout
