"""The gateway's HTTP protocol under uvicorn: httptools, with a graceful shutdown that drains keep-alive connections."""

# uvicorn's own shutdown closes every idle keep-alive connection at once. A client that has just sent its next
# request on one (a closed-loop load always has) then reads a reset, and HTTP clients never retry a POST by
# themselves (RFC 9110 9.2.2): a rolling restart of the workers failed a /recommend now and then (the chaos test
# did, about one run in ten). Draining instead: from the shutdown on, every answer says `connection: close`, so each
# client moves to a new connection (another worker takes it from the shared socket); a connection still idle after
# DRAIN_S is closed then, as before. A request in flight is finished as uvicorn always did.

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DRAIN_S = 2.0  # how long an idle keep-alive connection is kept open, answering with `connection: close`


class DrainingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose `shutdown` keeps idle connections open for DRAIN_S, closing each after
    its next answer (`connection: close`), instead of cutting them while a request may be on the wire."""

    draining = False

    def shutdown(self) -> None:
        """Called by uvicorn's server as the worker begins a graceful shutdown."""
        self.draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # in flight: closed after its answer (uvicorn's own behaviour)
            return
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self.loop.call_later(DRAIN_S, self.close_if_idle)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # a request that arrived while draining: answered, then closed

    def close_if_idle(self) -> None:
        """The end of the drain: close the connection unless a request is being answered (that one closes it)."""
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
