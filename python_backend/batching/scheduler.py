"""Continuous (in-flight) batching over an Engine.

One thread owns the engine. Between two decode steps it
  1. drops cancelled sequences (their slot is free for the next one),
  2. admits waiting requests into free slots (prefill, first token),
  3. runs one batched decode step over every running sequence and samples the next tokens.
Requests join and leave the batch at step boundaries; the KV cache never leaves the engine.
The scheduler knows nothing of Triton: each sequence carries a `sink` callable that receives
`Output`s, and an `is_cancelled` callable.

Sending a response and asking whether a request was cancelled are messages to the server
process. A second thread, the courier, does both, so the decode loop never waits on them: it
sends each sequence's outputs in order (merging a stream's queued pieces into one response when
it falls behind: fewer, larger deltas under load instead of a slower loop; first tokens and
final responses ahead of queued deltas) and polls cancellation, raising a flag that the loop
reads before every step.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np

from .detokenize import Release, TextTracker
from ..engines.base import Ban, Engine
from .sampling import Sampler, SamplingParams, sample_batch

log = logging.getLogger("tritonchat.scheduler")
METRICS_INTERVAL = 0.1  # seconds between two reports of the step metrics while sequences run


class QueueFull(RuntimeError):
    pass


@dataclasses.dataclass
class Output:
    release: Release | None
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str = ""  # "" while streaming; stop | length | cancelled when final
    final: bool = False
    error: str | None = None
    posted: float = dataclasses.field(default_factory=time.perf_counter)  # when the loop made it
    urgent: bool = False  # a stream's first text: the courier sends it before queued deltas


@dataclasses.dataclass(eq=False)
class Sequence:
    prompt_ids: np.ndarray
    params: SamplingParams
    tracker: TextTracker
    sink: Callable[[Output], None]
    stream: bool = False
    is_cancelled: Callable[[], bool] = lambda: False
    # runtime state
    slot: int = -1
    sampler: Sampler | None = None
    limit: int = 0  # tokens it may generate: max_tokens, or fewer where the context ends first
    generated: int = 0
    last_token: int = -1
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_sent: float = 0.0  # when the last streamed response left the loop
    cancelled: bool = False  # raised by the courier


class Courier:
    """Sends outputs and polls cancellation, off the decode loop.

    A sequence's outputs not yet sent wait as one merged output (a stream that falls behind gets
    fewer, larger deltas instead of slowing the loop). Sends go one at a time: first the urgent
    ones (a stream's first token, a final response, an error: a client's time to first token
    and the moment its slot's next request can come), in the order they became urgent, then the
    oldest waiting delta. Each sequence's outputs still go out in order: an urgent output carries
    the deltas queued before it."""

    def __init__(self, poll_interval: float = 0.05, stats: "Stats | None" = None):
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
                outs[-1] = dataclasses.replace(out, release=prev.release.merge(out.release), posted=prev.posted,
                                               urgent=prev.urgent or out.urgent)
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


def _ban_key(rows: list[Sequence], ban) -> tuple | None:
    """The end ids `ban` masks (the rows' common key), None without a ban."""
    return None if not ban else rows[int(ban.rows[0])].sampler.end_key


def _mergeable(prev: Output, out: Output) -> bool:
    """Can `out` join the unsent `prev` of the same sequence as one response? (Text deltas: yes;
    an error, or an output without text, stays on its own.)"""
    return not (prev.final or prev.error or out.error or prev.release is None or out.release is None)


def _greedy_ban(samplers: list[Sampler], ahead=0):
    """For an all-greedy batch: None (plain argmax) or the `Ban` of end ids for rows still under
    their `min_tokens` (`ahead` steps from now: one number, or one per row); False when some row
    needs the logits on the host."""
    rows, key, ids = [], None, None
    for i, s in enumerate(samplers):
        if not s.argmax_only:
            return False
        a = ahead if isinstance(ahead, int) else ahead[i]
        if s.generated + a < s.p.min_tokens and s.end_key:
            if key is None:
                key, ids = s.end_key, s.end_ids
            elif s.end_key != key:
                return False  # rows ban different ids: one mask cannot serve them
            rows.append(i)
    return Ban(np.array(rows, dtype=np.int64), ids) if rows else None


@dataclasses.dataclass
class Stats:
    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    batch_size_sum: int = 0
    chained: int = 0  # steps launched before the host had the previous step's tokens
    prefill_calls: int = 0
    mixed_steps: int = 0  # decode steps that carried prompts (prefilled inside the step)
    # where the scheduler thread's time went (seconds): in prefill calls (prompts in, first tokens
    # out; `prefill_exec_s` of it inside the engine), launching decode steps, waiting for a decode
    # step's tokens, in the per-token bookkeeping, idle (nothing to run)
    prefill_s: float = 0.0
    prefill_exec_s: float = 0.0
    launch_s: float = 0.0
    decode_wait_s: float = 0.0
    bookkeeping_s: float = 0.0
    idle_s: float = 0.0
    # time admitted requests waited in the queue (arrival to the start of their prefill), and time
    # slots stood empty between a request's end and the next admission into them: a slot's gap
    # minus the queue wait is what the request's successor spent outside the generator (the final
    # response's way to the client, the client, preprocessing)
    queue_s: float = 0.0
    slot_gap_s: float = 0.0
    slot_gaps: int = 0
    # responses the courier sent, the time spent sending them, and how long each waited from the
    # loop to the end of its send
    sends: int = 0
    send_s: float = 0.0  # inside the sends themselves
    send_lag_s: float = 0.0
    send_lag_max_s: float = 0.0
    # cancellation polls (one per watched sequence and round) and the time they took
    polls: int = 0
    poll_s: float = 0.0

    def summary(self) -> dict:
        """Counters and time split, for the log at shutdown."""
        out = dataclasses.asdict(self)
        out["avg_batch"] = round(self.batch_size_sum / self.steps, 2) if self.steps else 0.0
        calls = self.prefill_calls + self.mixed_steps
        out["prompts_per_prefill"] = round(self.prefills / calls, 2) if calls else 0.0
        out["queue_ms_mean"] = round(1e3 * self.queue_s / self.prefills, 2) if self.prefills else 0.0
        out["slot_gap_ms_mean"] = round(1e3 * self.slot_gap_s / self.slot_gaps, 2) if self.slot_gaps else 0.0
        out["send_lag_ms_mean"] = round(1e3 * self.send_lag_s / self.sends, 2) if self.sends else 0.0
        out["send_ms_mean"] = round(1e3 * self.send_s / self.sends, 3) if self.sends else 0.0
        out["poll_ms_mean"] = round(1e3 * self.poll_s / self.polls, 3) if self.polls else 0.0
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue_size: int = 256, prefill_token_budget: int = 2048,
                 prefill_wait: float = 0.0, stream_interval: float = 0.0, stream_rate: float = 0.0, metrics=None,
                 mix_prefill: bool = True):
        """`prefill_token_budget`: prompt tokens admitted (in one batched prefill) between two decode
        steps; one prompt is always admitted whatever its length. `prefill_wait`: seconds a request
        may wait, while other sequences decode, for more requests to share its prefill (a prefill
        stalls every running stream; on a GPU one of a few prompts costs about what one of one
        does). It never waits on an idle engine, nor once the waiting requests fill the free slots
        or the token budget. 0: admit at the next step. `stream_interval`: seconds; a
        stream's tokens are held until this long after its previous response and then go as one
        delta (the first token and the last response are never held). 0 sends every token.
        `metrics`: optional hooks `step(running, waiting, new_tokens)`, `first_token(seconds)`,
        `finished(reason, seconds)` (see metrics.GeneratorMetrics). `mix_prefill`: where the
        engine can (`can_mix`) and sequences are decoding, greedy requests are prefilled inside
        the next decode step (up to the engine's `mix_tokens` prompt tokens a step) instead of
        in a prefill of their own that stops every stream."""
        self.ex = engine
        self.max_queue_size = max_queue_size
        self.prefill_token_budget = prefill_token_budget
        self.prefill_wait = float(prefill_wait)
        self.mix_prefill = bool(mix_prefill) and engine.can_mix
        self.stream_interval = float(stream_interval)
        self.stream_rate = float(stream_rate)
        self._interval = self.stream_interval  # the current one, load included
        self.metrics = metrics
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(engine.max_slots - 1, -1, -1))
        self._freed_at: dict[int, float] = {}  # slot -> when its last sequence ended
        self.stats = Stats()
        self.courier = Courier(stats=self.stats)
        self._now = time.perf_counter()  # time of the current decode step's tokens
        self._unreported, self._reported_at = [0, 0], 0.0
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tritonchat-scheduler", daemon=True)
        self._thread.start()

    # -- public --------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_queue_size:
                raise QueueFull(f"generator queue is full ({self.max_queue_size} waiting requests); retry later")
            self.courier.watch(seq)  # before the loop can finish it (its final response unwatches it)
            self.waiting.append(seq)
            self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
        self.courier.shutdown(timeout)

    @property
    def load(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting)

    # -- loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                t = time.perf_counter()
                while not self._stop and not self.waiting and not self.running:
                    self._cv.wait()
                self.stats.idle_s += time.perf_counter() - t
                if self._stop:
                    break
            try:
                self._drop_cancelled()
                admitted = self._admit() if self._admission_due() and not self._mix_next() else 0
                if self.metrics and admitted:
                    self._report(admitted, 0)
                self._step()
            except Exception as exc:  # an engine failure fails the batch, not the server
                log.exception("generator step failed")
                for seq in self.running:
                    self._finish(seq, "", error=f"generator failed: {exc}")
                self.running = []
                if self.metrics:
                    self._report(0, 0)
        for seq in list(self.running) + list(self.waiting):
            self._finish(seq, "cancelled", error="server is shutting down")

    def _report(self, new_tokens: int, steps: int) -> None:
        """Metrics since the last report, sent at most every `METRICS_INTERVAL` while sequences run
        (each metric update is a message to the server process: one per step would cost more than
        the step)."""
        self._unreported[0] += new_tokens
        self._unreported[1] += steps
        now = time.perf_counter()
        if now - self._reported_at < METRICS_INTERVAL and self.running:
            return
        self._reported_at = now
        load, (new, steps) = (len(self.running), len(self.waiting)), self._unreported
        self._unreported = [0, 0]
        self.courier.call(lambda: self.metrics.step(*load, new, steps))

    def _drop_cancelled(self) -> None:
        if not any(s.cancelled for s in self.running):  # after every step: no new list then
            return
        keep = []
        for seq in self.running:
            if seq.cancelled:
                self.stats.cancelled += 1
                self._finish(seq, "cancelled")
            else:
                keep.append(seq)
        self.running = keep

    def _admission_due(self) -> bool:
        """Prefill the waiting requests now (before the next decode step)?"""
        waiting = self.waiting
        if not waiting or not self.free_slots:
            return False
        if self.prefill_wait <= 0 or not self.running or self._stop or len(waiting) >= len(self.free_slots):
            return True
        if time.perf_counter() - waiting[0].arrived >= self.prefill_wait:
            return True
        return sum(len(s.prompt_ids) for s in list(waiting)) >= self.prefill_token_budget

    def _admit(self) -> int:
        """Move waiting requests into free slots, all prefilled in one engine call; return how many."""
        batch = self._pop_waiting(len(self.free_slots), self.prefill_token_budget, lambda seq: True, first_always=True)
        if not batch:
            return 0
        self._place(batch)
        t = time.perf_counter()
        try:
            logits = self.ex.prefill_batch([s.slot for s in batch], [s.prompt_ids for s in batch])
            self.stats.prefill_exec_s += time.perf_counter() - t
        except Exception as exc:
            log.exception("prefill failed")
            for seq in batch:
                self._finish(seq, "", error=f"prefill failed: {exc}")
            return 0
        self.stats.prefills += len(batch)
        self.stats.prefill_calls += 1
        for seq, row in zip(batch, logits):
            self.running.append(seq)
            if not self._advance(seq, seq.sampler.choose(row)):
                self.running.remove(seq)
        self.stats.prefill_s += time.perf_counter() - t
        return len(batch)

    def _pop_waiting(self, cap: int, budget: int, fits: Callable[[Sequence], bool],
                     first_always: bool = False) -> list[Sequence]:
        """Up to `cap` requests from the head of the waiting line, while `fits` them and their
        prompts stay within `budget` tokens (`first_always`: the first one whatever its length);
        cancelled ones are finished on the way."""
        batch = []
        while len(batch) < cap:
            with self._cv:
                head = self.waiting[0] if self.waiting else None
                if head is None or not fits(head) or (
                        len(head.prompt_ids) > budget and not (first_always and not batch)):
                    break
                seq = self.waiting.popleft()
            if seq.cancelled:
                self.stats.cancelled += 1
                self._finish(seq, "cancelled")
                continue
            batch.append(seq)
            budget -= len(seq.prompt_ids)
        return batch

    def _place(self, batch: list[Sequence]) -> None:
        """Give admitted sequences their slots, samplers and limits."""
        t = time.perf_counter()
        for seq in batch:
            seq.slot = self.free_slots.pop()
            self.stats.queue_s += t - seq.arrived
            freed = self._freed_at.pop(seq.slot, None)
            if freed is not None:
                self.stats.slot_gap_s += t - freed
                self.stats.slot_gaps += 1
            if seq.sampler is None:
                seq.sampler = Sampler(seq.params, seq.prompt_ids, self.ex.vocab_size)
            seq.limit = min(seq.params.max_tokens, self.ex.max_seq_len - len(seq.prompt_ids))

    def _mixable(self, seq: Sequence, key) -> bool:
        """Can `seq` be prefilled inside a greedy decode step whose banned rows ban `key`?"""
        if seq.sampler is None:
            seq.sampler = Sampler(seq.params, seq.prompt_ids, self.ex.vocab_size)
        s = seq.sampler
        return (s.argmax_only and len(seq.prompt_ids) <= min(self.ex.mix_tokens, self.prefill_token_budget)
                and (key is None or not s.end_key or s.p.min_tokens <= 0 or s.end_key == key))

    def _mix_next(self) -> bool:
        """Will the next decode step carry the waiting requests? (Not when a running row needs the
        logits on the host, nor when the head of the line bans other end ids than the running rows.)"""
        ban = _greedy_ban([s.sampler for s in self.running])
        return ban is not False and self._mix_due(_ban_key(self.running, ban))

    def _mix_due(self, key=None) -> bool:
        """Admit the waiting requests inside the next decode step (rather than a prefill of their own)?"""
        if not (self.mix_prefill and self.running and self._admission_due()):
            return False
        with self._cv:
            head = self.waiting[0] if self.waiting else None
        return head is not None and self._mixable(head, key)

    def _pop_mix(self, key=None) -> list[Sequence]:
        """Take the waiting requests a decode step will carry (free slots, the engine's prompt
        and token caps, greedy, bans compatible with `key`); they join `running` now and get their
        first token from that step."""
        batch = self._pop_waiting(min(len(self.free_slots), self.ex.mix_prompts),
                                  min(self.ex.mix_tokens, self.prefill_token_budget), lambda seq: self._mixable(seq, key))
        if batch:
            self._place(batch)
            self.running.extend(batch)
            self.stats.prefills += len(batch)
            self.stats.mixed_steps += 1
        return batch

    def _step(self) -> None:
        """Decode steps over the running batch. Greedy batches on an engine that can chain run
        one step ahead: step t+1 is launched (fed by step t's tokens on the device) before the host
        takes step t's tokens, so the bookkeeping below overlaps the device's work. The chain goes
        on while the batch changes: a sequence whose last token is in flight is left out of the
        next step, one that ended on an end id wastes one row of the step already launched, and
        waiting greedy requests ride in the next step (`mix_prefill`) and join the chain with their
        first token. It stops for a request that needs a prefill of its own (not greedy, too long)
        or a row that needs the logits on the host."""
        batch = [s for s in self.running if s.slot >= 0]
        if not batch:
            return
        batch.sort(key=lambda s: s.slot)  # contiguous slots let engines avoid a gather
        slots = np.array([s.slot for s in batch], dtype=np.int64)
        last = np.array([s.last_token for s in batch], dtype=np.int64)
        samplers = [s.sampler for s in batch]
        ban = _greedy_ban(samplers)
        if ban is False:  # some row needs the logits on the host
            t = time.perf_counter()
            tokens = sample_batch(samplers, self.ex.decode(slots, last))
            self.stats.decode_wait_s += time.perf_counter() - t
            self._take(batch, tokens)
            return
        key = _ban_key(batch, ban)
        new = self._pop_mix(key) if self._mix_due(key) else []
        step = self._launch(batch, new, last, 0, None, ban)
        while True:
            ahead = None
            if self.ex.can_chain and not self._stop:
                rows = sorted((s for s in batch + new if s.slot >= 0 and not s.cancelled
                               and s.generated + 1 < s.limit), key=lambda s: s.slot)
                ahead = self._chain(rows, step)
            self._take(batch, self._tokens(step), new)
            if ahead is None:
                return
            self._drop_cancelled()  # their rows in the step ahead are dropped when it is taken
            batch, new, step = ahead

    def _chain(self, rows: list[Sequence], step):
        """Launch the step after `step` over `rows` (their tokens: `step`'s ids on the device)
        plus the waiting requests it can carry; (rows, new, step), or None to end the chain."""
        ban = _greedy_ban([s.sampler for s in rows], 1)
        if ban is False:
            return None
        key = _ban_key(rows, ban)
        new = []
        if self._admission_due():
            if not self._mix_due(key):
                return None  # a prefill of its own first
            new = self._pop_mix(key)
        if not rows and not new:
            return None
        self.stats.chained += 1
        return rows, new, self._launch(rows, new, None, 1, step, ban)

    def _launch(self, rows: list[Sequence], new: list[Sequence], tokens, ahead: int, chain, ban):
        """decode_greedy_begin over `rows` (`ahead`: steps in flight before this one; `ban`: theirs)
        carrying `new` prompts (the ban then covers their first-token rows too)."""
        if new:
            samplers = [s.sampler for s in rows] + [s.sampler for s in new]
            ban = _greedy_ban(samplers, [ahead] * len(rows) + [0] * len(new))
        slots = np.array([s.slot for s in rows], dtype=np.int64)
        prompts = (np.array([s.slot for s in new], dtype=np.int64), [s.prompt_ids for s in new]) if new else None
        t = time.perf_counter()
        step = self.ex.decode_greedy_begin(slots, tokens, ban, chain=chain, prompts=prompts)
        self.stats.launch_s += time.perf_counter() - t
        return step

    def _tokens(self, step) -> list[int]:
        t = time.perf_counter()
        tokens = step.result().tolist()
        self.stats.decode_wait_s += time.perf_counter() - t
        return tokens

    def _take(self, batch: list[Sequence], tokens: list[int], new: list[Sequence] = ()) -> int:
        """Account one step's tokens (the rows of `batch`, then the first tokens of the `new`
        sequences it prefilled); rows of sequences that ended meanwhile are dropped. Returns how
        many sequences ended."""
        t = time.perf_counter()
        try:
            return self._account(batch, tokens, new)
        finally:
            self.stats.bookkeeping_s += time.perf_counter() - t

    def _account(self, batch: list[Sequence], tokens: list[int], new=()) -> int:
        live = [(s, t) for s, t in zip(batch, tokens) if s.slot >= 0]
        self.stats.steps += 1
        self.stats.batch_size_sum += len(live)
        self._now = time.perf_counter()
        if self.stream_rate > 0:
            self._interval = max(self.stream_interval, sum(s.stream for s, _ in live) / self.stream_rate)
        done = {id(s) for s, t in live if not self._advance(s, t)}
        done |= {id(s) for s, t in zip(new, tokens[len(batch):]) if not self._advance(s, t)}
        if done:
            self.running = [s for s in self.running if id(s) not in done]
        if self.metrics:
            self._report(len(live) + len(new), 1)
        return len(done)

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Account one sampled token; return False when the sequence finished."""
        seq.sampler.observe(token)
        seq.generated += 1
        seq.last_token = token
        self.stats.tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            if self.metrics:
                ttft = seq.first_token_at - seq.arrived
                self.courier.call(lambda: self.metrics.first_token(ttft))
        p = seq.params
        if token in p.end_ids:  # the sampler masks end ids until min_tokens
            self._finish(seq, "stop")
            return False
        if seq.tracker.append(token):
            self._finish(seq, "stop")
            return False
        if seq.generated >= seq.limit:
            self._finish(seq, "length")
            return False
        if seq.stream:
            now = self._now if seq.generated > 1 else time.perf_counter()
            if seq.generated == 1 or now - seq.last_sent >= self._interval:
                rel = seq.tracker.ready()
                if rel is not None:
                    first = seq.last_sent == 0.0  # the stream's first text (a held-back byte may delay it)
                    seq.last_sent = now
                    self._send(seq, Output(rel, len(seq.prompt_ids), seq.generated, urgent=first))
        return True

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.slot >= 0:
            self.ex.release(seq.slot)
            self.free_slots.append(seq.slot)
            self._freed_at[seq.slot] = time.perf_counter()
            seq.slot = -1
        self.stats.finished += 1
        if self.metrics:
            e2e = time.perf_counter() - seq.arrived
            self.courier.call(lambda: self.metrics.finished(reason, e2e))
        rel = None if error else seq.tracker.final()
        self._send(seq, Output(rel, len(seq.prompt_ids), seq.generated, reason, final=True, error=error))

    def _send(self, seq: Sequence, out: Output) -> None:
        self.courier.post(seq, out)
