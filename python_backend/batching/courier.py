"""The courier: the thread that talks to the server process for the decode loop.

Sending a response and asking whether a request was cancelled are messages to the server
process. A second thread, the courier, does both, so the decode loop never waits on them: it
sends each sequence's outputs in order (merging a stream's queued pieces into one response when
it falls behind: fewer, larger deltas under load instead of a slower loop; first tokens and
final responses ahead of queued deltas) and polls cancellation, raising a flag that the loop
reads before every step. It also runs the scheduler's metrics updates (`call`): every metric call
into the server stays on this one thread.

Each send waits for the server process (0.5-1.2 ms on the GPU host; docs/benchmarks-gpu.md), so a
wave of streams that start together would get their first tokens one send apart: the sixteenth of
sixteen ~11 ms after the first. `first_senders` threads send first tokens beside the courier (the
send releases the GIL while it waits), a stream's later outputs only after its first.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

from .. import timeline
from .sequence import Output, Sequence, Stats

log = logging.getLogger("tritonchat.scheduler")


class Courier:
    """Sends outputs and polls cancellation, off the decode loop.

    A sequence's outputs not yet sent after its first text wait as one merged output (a stream
    that falls behind gets fewer, larger deltas instead of slowing the loop). The courier sends one
    at a time: first the urgent ones (a stream's first token, a final response, an error: a client's
    time to first token and the moment its slot's next request can come), in the order they
    became urgent, then the oldest waiting delta; metric updates wait behind urgent sends (at most
    TASK_DELAY_MAX). With `first_senders`, first tokens go on those threads instead, beside it. Each
    sequence's outputs still go out in order: an urgent output carries the deltas queued before it,
    and nothing of a stream goes while its first token is being sent.

    A sequence is watched (polled for cancellation) from `watch` until its final output is taken
    for sending: tritonserver must never be asked about a request after its final response."""

    TASK_DELAY_MAX = 0.1  # s: metric updates wait behind urgent sends at most this long

    def __init__(self, poll_interval: float = 0.05, stats: Stats | None = None, first_senders: int = 0):
        self.poll_interval = poll_interval
        self.stats = stats if stats is not None else Stats()  # its send counters only
        self.pending: dict[Sequence, list[Output]] = {}  # insertion order: oldest first
        self.urgent: collections.deque[Sequence] = collections.deque()
        self.tasks: collections.deque[Callable[[], None]] = collections.deque()
        self._tasks_since = 0.0  # when the oldest waiting task was queued
        self.watched: set[Sequence] = set()
        # first tokens for the first-token senders, and the sequences whose first token one is sending
        # (the courier leaves their later outputs until it is out: each stream's outputs stay in order)
        self.firsts: collections.deque[tuple[Sequence, Output]] = collections.deque()
        self.flying: set[Sequence] = set()
        lock = threading.RLock()  # one state, two conditions: the courier's and the senders'
        self._cv = threading.Condition(lock)
        self._firsts_cv = threading.Condition(lock)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tritonchat-courier", daemon=True)
        self._senders = [threading.Thread(target=self._send_firsts, name=f"tritonchat-first-{i}", daemon=True)
                         for i in range(max(0, int(first_senders)))]
        self._thread.start()
        for t in self._senders:
            t.start()

    def post(self, seq: Sequence, out: Output) -> None:
        if out.urgent:
            timeline.mark("posted", seq.request_id)
        with self._cv:
            if (self._senders and out.urgent and not (out.final or out.error) and seq not in self.pending
                    and seq not in self.flying):
                self.flying.add(seq)  # a first token: a first-token sender takes it now
                self.firsts.append((seq, out))
                self._firsts_cv.notify()
                return
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
            if not self.tasks:
                self._tasks_since = time.perf_counter()
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
            self._firsts_cv.notify_all()
        deadline = time.perf_counter() + timeout
        for t in [*self._senders, self._thread]:
            t.join(max(0.0, deadline - time.perf_counter()))

    def _next(self) -> tuple[Sequence, list[Output], bool] | None:
        """The next sequence's outputs to send and whether they are urgent (lock held): urgent
        first, else the oldest; never those of a sequence whose first token is still being sent."""
        for _ in range(len(self.urgent)):
            seq = self.urgent.popleft()
            if seq in self.flying:
                self.urgent.append(seq)  # after its first token
            elif seq in self.pending:  # else already sent with an earlier urgent output of it
                return seq, self.pending.pop(seq), True
        for seq in self.pending:
            if seq not in self.flying:
                return seq, self.pending.pop(seq), False
        return None

    def _loop(self) -> None:
        next_poll = 0.0
        st = self.stats
        while True:
            with self._cv:
                item = self._next()
                if item is None and not self.tasks and (not self._stop or self.pending):
                    self._cv.wait(self.poll_interval if self.watched or self.pending else None)
                    item = self._next()
                if item is not None and item[2] and self.tasks and \
                        time.perf_counter() - self._tasks_since < self.TASK_DELAY_MAX:
                    tasks = ()  # an urgent send goes first: each metric update is a message too
                else:
                    tasks, self.tasks = self.tasks, collections.deque()
                stopping = self._stop and item is None and not tasks and not self.pending
                if item is not None and item[1][-1].final:
                    self.watched.discard(item[0])
            if tasks:
                t = time.perf_counter()
                for fn in tasks:
                    try:
                        fn()
                    except Exception:
                        log.exception("courier task failed")
                st.metric_calls += len(tasks)
                st.metric_s += time.perf_counter() - t
            if item is not None:
                self._send(item[0], item[1])
            if stopping:
                return
            now = time.perf_counter()
            if now >= next_poll:
                with self._cv:  # not one whose first token a sender is sending: one call at a time
                    watched = [s for s in self.watched if s not in self.flying]
                for seq in watched:
                    if not seq.cancelled and seq.is_cancelled():
                        seq.cancelled = True
                with self._cv:
                    st.polls += len(watched)
                    st.poll_s += time.perf_counter() - now
                next_poll = now + self.poll_interval

    def _send_firsts(self) -> None:
        """A first-token sender: sends first tokens as they come, beside the courier."""
        while True:
            with self._cv:
                while not self.firsts and not self._stop:
                    self._firsts_cv.wait()
                if not self.firsts:
                    return
                seq, out = self.firsts.popleft()
            self._send(seq, [out])
            with self._cv:
                self.flying.discard(seq)
                if seq in self.pending:
                    self._cv.notify()  # the courier may send its later outputs now

    def _send(self, seq: Sequence, outs: list[Output]) -> None:
        for out in outs:
            t = time.perf_counter()
            if out.urgent:
                timeline.mark("send_start", seq.request_id)
            try:
                seq.sink(out)
            except Exception:  # a client that went away must not stop the courier
                log.exception("could not send a response")
            done = time.perf_counter()
            if out.urgent:
                timeline.mark("send_end", seq.request_id)
            lag = done - out.posted
            with self._cv:  # several threads count here
                st = self.stats
                st.send_s += done - t
                st.sends += 1
                st.send_lag_s += lag
                st.send_lag_max_s = max(st.send_lag_max_s, lag)


def _mergeable(prev: Output, out: Output) -> bool:
    """Can `out` join the unsent `prev` of the same sequence as one response? (Text deltas: yes;
    an error, or an output without text, stays on its own. A stream's first text goes alone even
    when the courier is behind: a client times its first token by the first response, and a tiny
    model on a busy host could otherwise finish its whole answer before that send and stream it
    as one response.)"""
    return not (prev.final or prev.urgent or prev.error or out.error or prev.release is None
                or out.release is None)
