"""A streamed answer as Server-Sent Events, written straight to ASGI.

Starlette's ``StreamingResponse`` (under uvicorn, ASGI spec 2.3) runs every stream in an anyio task
group with a second task listening for the disconnect, and cancel scopes around both: measured at
16 streams on 2 cores, that machinery was a sixth of the gateway's CPU per request. Here the body runs
in the request's own task and one plain task waits for ``http.disconnect``; when it comes first it
cancels the request's task, so a client that goes away mid-stream still stops the Triton call at once
(while the body waits for Triton's next response, not only at the next write).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Dict, Optional

__all__ = ["SSEResponse", "Last"]

_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"))


class Last(bytes):
    """A body's last chunk: it goes out with the end of the HTTP body in one write."""


class SSEResponse:
    """An ASGI response: `body`'s byte chunks as they come (a `Last` chunk ends the HTTP body with it);
    `ending` runs once when the response is over, whether it completed, failed, or the client
    disconnected."""

    def __init__(self, body: AsyncIterator[bytes], ending: Callable[[], Awaitable[None]],
                 headers: Optional[Dict[str, str]] = None):
        self.body = body
        self.ending = ending
        self.headers = list(_HEADERS) + [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                         for k, v in (headers or {}).items()]

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        gone = over = False

        def disconnected(watch: "asyncio.Future[None]") -> None:
            nonlocal gone
            # `over`: a callback already scheduled when the stream ended must not cancel what follows
            if not over and not watch.cancelled() and watch.exception() is None:
                gone = True
                task.cancel()

        watch = asyncio.ensure_future(_wait_disconnect(receive))
        watch.add_done_callback(disconnected)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            ended = False
            async for chunk in self.body:  # to the body's own end: its bookkeeping after `Last` runs too
                if not ended:
                    ended = isinstance(chunk, Last)
                    await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                    if ended:  # the response is complete: uvicorn now answers receive() with a disconnect
                        over = True
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+: this cancellation is handled
            if uncancel is not None:
                uncancel()
        except OSError:  # the transport closed under a write: the client is gone too
            pass
        finally:
            over = True
            watch.remove_done_callback(disconnected)
            watch.cancel()
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                await aclose()  # the body's own finally (a body never started runs none)
            await self.ending()


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
