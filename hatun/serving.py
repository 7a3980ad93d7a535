"""Serving connections so that no client can take hatun down: the one accept loop of the metrics
HTTP server and the control socket.

- A handler that raises is logged (one line per failed request, with its traceback at debug level)
  and the server goes on: nothing a request contains can end the nursery that holds the supervisor.
- At most `limit` connections are served at once; further ones are closed at once, so thousands
  of idle connections cost a descriptor each for a moment, never a task or a buffer.
- Running out of descriptors or memory at accept (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses
  accepting briefly instead of failing.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("hatun.serving")

MAX_CONNECTIONS = 64
_ACCEPT_PAUSE = 0.1  # after EMFILE & co. (like trio.serve_listeners)
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class RateLimitedLog:
    """Logs a repeated message at most once per INTERVAL seconds, counting the ones it held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args, **kw) -> None:
        now = trio.current_time()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        self.logger.log(level, msg + (f" (and {held} more like it)" if held else ""), *args, **kw)


async def serve_bounded(listener: trio.abc.Listener, handler: Callable[[trio.abc.Stream], Awaitable[None]], *,
                        name: str, limit: int = MAX_CONNECTIONS,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections on LISTENER forever and run HANDLER(stream) for each, at most LIMIT at once.

    HANDLER owns the stream (and should close it); it is closed here too once the handler returns
    or raises. An exception from HANDLER is logged, never propagated.
    """
    slots = trio.CapacityLimiter(limit)
    errors = RateLimitedLog(log)

    async def run(stream: trio.abc.Stream) -> None:
        try:
            await handler(stream)
        except Exception as e:  # noqa: BLE001 - a request must never end the server
            errors.log(logging.ERROR, "handler", "%s: a request failed: %s: %s", name, type(e).__name__, e,
                       exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            slots.release_on_behalf_of(stream)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in _RESOURCE_ERRORS:
                    errors.log(logging.ERROR, "accept", "%s: accept failed: %s", name, e)
                else:
                    errors.log(logging.WARNING, "accept", "%s: cannot accept connections: %s; pausing", name,
                               e.strerror or e)
                await trio.sleep(_ACCEPT_PAUSE)
                continue
            try:
                slots.acquire_on_behalf_of_nowait(stream)
            except trio.WouldBlock:
                errors.log(logging.WARNING, "full", "%s: %d connections open, refusing more", name, limit)
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.aclose()
                continue
            nursery.start_soon(run, stream)
