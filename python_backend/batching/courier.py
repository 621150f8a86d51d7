"""The courier: the thread that talks to the server process for the decode loop.

Sending a response and asking whether a request was cancelled are messages to the server
process. A second thread, the courier, does both, so the decode loop never waits on them: it
sends each sequence's outputs in order (merging a stream's queued pieces into one response when
it falls behind: fewer, larger deltas under load instead of a slower loop; first tokens and
final responses ahead of queued deltas) and polls cancellation, raising a flag that the loop
reads before every step. It also runs the scheduler's metrics updates (`call`): every call into
the server stays on this one thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

from .sequence import Output, Sequence, Stats

log = logging.getLogger("tritonchat.scheduler")


class Courier:
    """Sends outputs and polls cancellation, off the decode loop.

    A sequence's outputs not yet sent after its first text wait as one merged output (a stream
    that falls behind gets fewer, larger deltas instead of slowing the loop). Sends go one at a
    time: first the urgent ones (a stream's first token, a final response, an error: a client's
    time to first token and the moment its slot's next request can come), in the order they
    became urgent, then the oldest waiting delta. Each sequence's outputs still go out in order:
    an urgent output carries the deltas queued before it.

    A sequence is watched (polled for cancellation) from `watch` until its final output is taken
    for sending: tritonserver must never be asked about a request after its final response."""

    def __init__(self, poll_interval: float = 0.05, stats: Stats | None = None):
        self.poll_interval = poll_interval
        self.stats = stats if stats is not None else Stats()  # its send counters only
        self.pending: dict[Sequence, list[Output]] = {}  # insertion order: oldest first
        self.urgent: collections.deque[Sequence] = collections.deque()
        self.tasks: collections.deque[Callable[[], None]] = collections.deque()
        self.watched: set[Sequence] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tritonchat-courier", daemon=True)
        self._thread.start()

    def post(self, seq: Sequence, out: Output) -> None:
        with self._cv:
            outs = self.pending.get(seq)
            if outs is None:
                self.pending[seq] = [out]
            elif _mergeable(outs[-1], out):
                prev = outs[-1]
                outs[-1] = dataclasses.replace(out, release=prev.release.merge(out.release), posted=prev.posted)
            else:
                outs.append(out)
            if out.urgent or out.final or out.error:
                self.urgent.append(seq)
            self._cv.notify()

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the courier thread (metrics: every call into the server stays on one thread)."""
        with self._cv:
            self.tasks.append(fn)
            self._cv.notify()

    def watch(self, seq: Sequence) -> None:
        with self._cv:
            self.watched.add(seq)
            self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    def _next(self) -> tuple[Sequence, list[Output]] | None:
        """The next sequence's outputs to send (lock held): urgent first, else the oldest."""
        while self.urgent:
            seq = self.urgent.popleft()
            if seq in self.pending:  # else already sent with an earlier urgent output of it
                return seq, self.pending.pop(seq)
        if self.pending:
            seq = next(iter(self.pending))
            return seq, self.pending.pop(seq)
        return None

    def _loop(self) -> None:
        next_poll = 0.0
        st = self.stats
        while True:
            with self._cv:
                if not self.pending and not self.tasks and not self._stop:
                    self._cv.wait(self.poll_interval if self.watched else None)
                tasks, self.tasks = self.tasks, collections.deque()
                item = self._next()
                stopping = self._stop and item is None and not tasks
                if item is not None and item[1][-1].final:
                    self.watched.discard(item[0])
            for fn in tasks:
                try:
                    fn()
                except Exception:
                    log.exception("courier task failed")
            if item is not None:
                seq, outs = item
                for out in outs:
                    t = time.perf_counter()
                    try:
                        seq.sink(out)
                    except Exception:  # a client that went away must not stop the courier
                        log.exception("could not send a response")
                    done = time.perf_counter()
                    lag = done - out.posted
                    st.send_s += done - t
                    st.sends += 1
                    st.send_lag_s += lag
                    st.send_lag_max_s = max(st.send_lag_max_s, lag)
            if stopping:
                return
            now = time.perf_counter()
            if now >= next_poll:
                with self._cv:
                    watched = list(self.watched)
                for seq in watched:
                    if not seq.cancelled and seq.is_cancelled():
                        seq.cancelled = True
                st.polls += len(watched)
                st.poll_s += time.perf_counter() - now
                next_poll = now + self.poll_interval


def _mergeable(prev: Output, out: Output) -> bool:
    """Can `out` join the unsent `prev` of the same sequence as one response? (Text deltas: yes;
    an error, or an output without text, stays on its own. A stream's first text goes alone even
    when the courier is behind: a client times its first token by the first response, and a tiny
    model on a busy host could otherwise finish its whole answer before that send and stream it
    as one response.)"""
    return not (prev.final or prev.urgent or prev.error or out.error or prev.release is None
                or out.release is None)
