"""Continuous (in-flight) batching over an Engine.

One thread owns the engine. Between two decode steps it
  1. drops cancelled sequences (their slot is free for the next one),
  2. admits waiting requests into free slots (prefill, first token),
  3. runs one batched decode step over every running sequence and samples the next tokens.
Requests join and leave the batch at step boundaries; the KV cache never leaves the engine.
The scheduler knows nothing of Triton: each sequence carries a `sink` callable that receives
`Output`s, and an `is_cancelled` callable (sequence.py). The courier (courier.py) sends the
outputs and polls cancellation on a thread of its own, so the decode loop never waits on the
server process.

Greedy batches take their argmax in the engine (`decode_greedy_begin`); on an engine that can draw
(`engine.can_sample`, `sample_on_device`), so do sampled rows and rows with penalties, all but those
with bad words (their uniform numbers and penalties go with the step: `draws_of`; the engine keeps
their token counts: `engine.track`). That allows two more things where the engine can:
- chaining (`engine.can_chain`): the next step is launched, fed by this step's tokens on the
  device, before the host takes this step's tokens (`_chain`);
- prompts inside decode steps (`engine.can_mix`, `mix_prefill`): waiting requests of that kind are
  prefilled inside the next decode step instead of in a prefill of their own that stops every
  stream (`_mix_due`, `_pop_mix`).
Where the engine can (`engine.can_reuse_prefix`, `prefix_reuse`), a prompt goes into the free slot
that still holds the KV of its longest prefix, and only the rest is prefilled (prefix.py). On such an
engine a prompt longer than `prefill_chunk` tokens is prefilled a piece at a time, one piece between
two decode steps (`_chunk`), so that a long prompt does not stop every stream for its whole prefill.

Reading order: `_loop` (one round), `_step` (the decode steps), then their parts, admission
(`_admit`; `_pop_mix` for prompts inside decode steps) and accounting (`_take`, `_advance`, `_finish`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import numpy as np

from .. import timeline
from ..engines.base import Engine
from .courier import Courier
from .prefix import PrefixCache
from .sampling import NONFINITE_MESSAGE, Sampler, ban_key, choose_safely, draws_of, greedy_ban, sample_batch
from .sequence import Output, QueueFull, Sequence, Stats

log = logging.getLogger("tritonchat.scheduler")
METRICS_INTERVAL = 0.1  # seconds between two reports of the step metrics while sequences run

__all__ = ["Courier", "Output", "QueueFull", "Scheduler", "Sequence", "Stats"]


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue_size: int = 256, prefill_token_budget: int = 2048,
                 prefill_wait: float = 0.0, stream_interval: float = 0.0, stream_rate: float = 0.0, metrics=None,
                 mix_prefill: bool = True, queue_timeout: float = 0.0, prefix_reuse: bool = True,
                 prefill_chunk: int = 0, first_senders: int = 0, cancel_poll: float = 0.05,
                 sample_on_device: bool = True):
        """`prefill_token_budget`: prompt tokens admitted (in one batched prefill) between two decode
        steps; one prompt is always admitted whatever its length. `prefill_wait`: seconds a request
        may wait, while other sequences decode, for more requests to share its prefill (a prefill
        stalls every running stream; on a GPU one of a few prompts costs about what one of one
        does). It never waits on an idle engine, nor once the waiting requests fill the free slots
        or the token budget. 0: admit at the next step. `stream_interval`: seconds; a
        stream's tokens are held until this long after its previous response and then go as one
        delta (the first token and the last response are never held). 0 sends every token.
        `stream_rate`: responses per second all streams share; the interval grows with the streams
        running (0: off). `metrics`: optional hooks `step(running, waiting, new_tokens, steps)`,
        `first_token(seconds)`, `finished(reason, seconds)` (see metrics.GeneratorMetrics), called
        on the courier's thread. `mix_prefill`: where the engine can (`can_mix`) and sequences are
        decoding, greedy requests (and, with `sample_on_device`, sampled or penalised ones without bad
        words) are prefilled inside the next decode step (up to the engine's
        `mix_tokens` prompt tokens a step) instead of in a prefill of their own that stops every
        stream. `queue_timeout`: seconds a request may wait for a slot before it is refused (0: no
        limit). `prefix_reuse`: where the engine can (`can_reuse_prefix`), a prompt reuses the KV of
        its longest prefix that a slot holds (prefix.py; `metrics.reused(tokens)` counts them).
        `prefill_chunk`: where the engine can run a prompt on top of KV its slot holds
        (`can_reuse_prefix`), a prompt with more tokens than this left to compute is prefilled this
        many at a time, one piece between two decode steps (0: whole). Each piece runs on the KV of
        the pieces before, which on the ONNX Runtime engines is bitwise a whole prefill's.
        `first_senders`: threads that send first tokens beside the courier (courier.py). `cancel_poll`:
        seconds between two polls of a running request's cancellation (the courier's).
        `sample_on_device`: where the engine can (`can_sample`), the tokens of sampled requests and of
        requests with penalties (all but those with bad words) are chosen by the engine, so their steps
        chain and carry prompts as greedy ones do; False: every step with such a row brings its logits
        to the host (the sampler there)."""
        self.engine = engine
        self.max_queue_size = max_queue_size
        self.prefill_token_budget = prefill_token_budget
        self.prefill_wait = float(prefill_wait)
        self.queue_timeout = float(queue_timeout)
        self.mix_prefill = bool(mix_prefill) and engine.can_mix
        self.draw = bool(sample_on_device) and engine.can_sample
        self.stream_interval = float(stream_interval)
        self.stream_rate = float(stream_rate)
        self._interval = self.stream_interval  # the current one, load included
        self.metrics = metrics
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(engine.max_slots - 1, -1, -1))  # in the order they were freed
        self.prefixes = PrefixCache(engine.reuse_min_new) if prefix_reuse and engine.can_reuse_prefix else None
        self.prefill_chunk = max(int(prefill_chunk), engine.reuse_min_new) \
            if prefill_chunk and engine.can_reuse_prefix and engine.prompt_chunks else 0
        self.chunked: collections.deque[list] = collections.deque()  # [sequence, prompt tokens in its KV]
        self._freed_at: dict[int, float] = {}  # slot -> when its last sequence ended
        self.stats = Stats()
        self.courier = Courier(poll_interval=cancel_poll, stats=self.stats, first_senders=first_senders)
        self._now = time.perf_counter()  # time of the current decode step's tokens
        self._unreported, self._reported_at = [0, 0], 0.0
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tritonchat-scheduler", daemon=True)
        self._thread.start()

    # -- public --------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._cv:
            # a request that a free slot takes at the next step is not in the waiting line: without
            # counting them, a burst that arrives before the loop admits anyone was refused while slots
            # stood free (seen through the gateway: 1 slot, a line of 1, 6 at once, 1 answered)
            if len(self.waiting) >= self.max_queue_size + len(self.free_slots):
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

    def wake(self) -> None:
        """Have the loop look at its sequences now (a cancellation raised from outside)."""
        with self._cv:
            self._cv.notify()

    @property
    def load(self) -> tuple[int, int]:
        return len(self.running) + len(self.chunked), len(self.waiting)

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                t = time.perf_counter()
                while not self._stop and not self.waiting and not self.running and not self.chunked:
                    self._cv.wait()
                self.stats.idle_s += time.perf_counter() - t
                if self._stop:
                    break
            try:
                self._drop_cancelled()
                if self.queue_timeout > 0:
                    self._drop_timed_out()
                waiting = len(self.waiting)
                admitted = self._admit() if self._admission_due() and not self._mix_next() else 0
                # also when only cancelled requests left the line: the waiting gauge must not keep them
                if self.metrics and (admitted or len(self.waiting) != waiting):
                    self._report(admitted, 0)
                if self.chunked:
                    self._chunk()
                self._step()
            except Exception as exc:  # an engine failure fails the batch, not the server
                log.exception("generator step failed")
                # the message names the failure, never its text: an engine's may hold file paths
                for seq in self.running:
                    self._finish(seq, "", error=f"generator failed: the engine raised {type(exc).__name__} "
                                                "during a decode step (details in the server log)")
                self.running = []
                if self.metrics:
                    self._report(0, 0)
        for seq in list(self.running) + [c[0] for c in self.chunked] + list(self.waiting):
            self._finish(seq, "cancelled", error="server is shutting down")

    def _step(self) -> None:
        """Decode steps over the running batch. Greedy batches on an engine that can chain run
        one step ahead: step t+1 is launched (fed by step t's tokens on the device) before the host
        takes step t's tokens, so the host's bookkeeping (`_take`) overlaps the device's work. The
        chain goes on while the batch changes: a sequence whose last token is in flight is left out
        of the next step, one that ended on an end id wastes one row of the step already launched,
        and waiting greedy requests (and sampled or penalised ones the engine draws) ride in the next
        step (`mix_prefill`) and join the chain with their first token. It stops for a request that
        needs a prefill of its own (bad words, or penalties or sampling where the engine does not draw;
        too long) or a row that needs the logits on the host."""
        # sorted: contiguous slots let engines avoid a gather
        rows = sorted((s for s in self.running if s.slot >= 0), key=lambda s: s.slot)
        if not rows:
            return
        ban = greedy_ban([s.sampler for s in rows], draw=self.draw)
        if ban is False:  # some row needs the logits on the host
            self._take(rows, self._sample(rows))
            return
        key = ban_key(rows, ban)
        new = self._pop_mix(key) if self._mix_due(key) else []
        step = self._launch(rows, new, ban, tokens=np.array([s.last_token for s in rows], dtype=np.int64))
        while True:
            ahead = self._chain(rows + new, step) if self.engine.can_chain and not self._stop else None
            self._take(rows, self._tokens(step), new)
            if ahead is None:
                return
            self._drop_cancelled()  # their rows in the step ahead are dropped when it is taken
            rows, new, step = ahead

    # -- decode steps --------------------------------------------------------------------
    def _sample(self, rows: list[Sequence]) -> list[int]:
        """One decode step whose logits come to the host; the rows' next tokens."""
        slots = np.array([s.slot for s in rows], dtype=np.int64)
        last = np.array([s.last_token for s in rows], dtype=np.int64)
        t = time.perf_counter()
        tokens, errors = sample_batch([s.sampler for s in rows], self.engine.decode(slots, last))
        self.stats.decode_wait_s += time.perf_counter() - t
        for i, message in errors.items():
            rows[i].failure = message
        return tokens

    def _chain(self, seqs: list[Sequence], step):
        """Launch the step after `step` (in flight) over the sequences of `seqs` that go on (their
        tokens: `step`'s ids on the device) plus the waiting requests it can carry; (rows, new, step),
        or None to end the chain (a row needs its logits on the host, or a prefill of its own is due)."""
        rows = sorted((s for s in seqs if s.slot >= 0 and not s.cancelled and s.generated + 1 < s.limit),
                      key=lambda s: s.slot)
        ban = greedy_ban([s.sampler for s in rows], 1, draw=self.draw)
        if ban is False:
            return None
        key = ban_key(rows, ban)
        new = []
        if self._admission_due():
            if not self._mix_due(key):
                return None  # a prefill of its own first
            new = self._pop_mix(key)
        if not rows and not new:
            return None
        self.stats.chained += 1
        return rows, new, self._launch(rows, new, ban, ahead=1, chain=step)

    def _launch(self, rows: list[Sequence], new: list[Sequence], ban, tokens=None, ahead: int = 0, chain=None):
        """decode_greedy_begin over `rows` (`ahead`: steps in flight before this one; `ban`: theirs)
        carrying `new` prompts (the ban then covers their first-token rows too)."""
        samplers = [s.sampler for s in rows] + [s.sampler for s in new]
        if new:
            ban = greedy_ban(samplers, [ahead] * len(rows) + [0] * len(new), draw=self.draw)
        slots = np.array([s.slot for s in rows], dtype=np.int64)
        prompts = (np.array([s.slot for s in new], dtype=np.int64), [s.prompt_ids for s in new],
                   [s.reused for s in new]) if new else None
        t = time.perf_counter()
        draws = draws_of(samplers) if self.draw else None  # each sampled row's next uniform number
        if draws is not None:
            self.stats.drawn += len(draws.rows)
        step = self.engine.decode_greedy_begin(slots, tokens, ban, chain=chain, prompts=prompts, draws=draws)
        self.stats.launch_s += time.perf_counter() - t
        return step

    def _tokens(self, step) -> list[int]:
        """The tokens of a launched step (waits for the engine where it still runs)."""
        t = time.perf_counter()
        tokens = step.result().tolist()
        self.stats.decode_wait_s += time.perf_counter() - t
        return tokens

    # -- admission: a prefill of its own -------------------------------------------------
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
        """Move waiting requests into free slots, prefilled in one engine call (a long prompt: a
        piece at a time, `_chunk`; prompts on a cached prefix one per call where the engine runs
        them one at a time anyway); return how many."""
        batch = self._pop_waiting(len(self.free_slots), self.prefill_token_budget, lambda seq: True, first_always=True)
        if not batch:
            return 0
        self._place(batch)
        admitted = len(batch)
        if self.prefill_chunk:
            whole = []
            for s in batch:
                if len(s.prompt_ids) - s.reused > self.prefill_chunk:
                    self.chunked.append([s, s.reused])
                else:
                    whole.append(s)
            if not whole:
                return admitted
            batch = whole
        cached = [s for s in batch if s.reused]
        if cached and not self.engine.batches_cached_prefills:
            # the engine runs them one at a time anyway (ONNX Runtime's fused graph must): the
            # shortest first, each one's first token sent before the next starts; then the prompts
            # with nothing cached, in one batch (sent along with them, each would wait for them all)
            fresh = [s for s in batch if not s.reused]
            groups = [[s] for s in sorted(cached, key=lambda s: len(s.prompt_ids) - s.reused)]
            groups += [fresh] if fresh else []
        else:
            groups = [batch]
        for group in groups:
            self._prefill_group(group)
        return admitted

    def _prefill_group(self, batch: list[Sequence]) -> None:
        """Prefill `batch` (one engine call, `_prefill`); the sequences join the decode steps with
        their first tokens."""
        t = time.perf_counter()
        batch, logits = self._prefill(batch)
        self.stats.prefill_exec_s += time.perf_counter() - t
        for seq in batch:
            timeline.mark("computed", seq.request_id)
        self.stats.prefills += len(batch)
        self.stats.prefill_calls += 1
        if self.prefixes is not None:
            self._count_reuse(batch)
        for seq, row in zip(batch, logits):
            self.running.append(seq)
            token, seq.failure = choose_safely(seq.sampler, row)
            if not self._advance(seq, token):
                self.running.remove(seq)
        self.stats.prefill_s += time.perf_counter() - t

    def _chunk(self) -> None:
        """The next piece of the oldest long prompt: `prefill_chunk` more of its tokens on top of the KV
        its slot holds; after the last piece it has its first token and joins the decode steps."""
        entry = self.chunked[0]
        seq, start = entry
        n = len(seq.prompt_ids)
        end = start + self.prefill_chunk
        if n - end < self.engine.reuse_min_new:  # a last piece too short to compute alone joins this one
            end = n
        t = time.perf_counter()
        try:
            logits = self.engine.prefill_cached([seq.slot], [seq.prompt_ids[:end]], [start])[0]
        except Exception as exc:  # noqa: BLE001 - this prompt fails alone
            log.exception("prefill of tokens [%d, %d) of a %d-token prompt failed", start, end, n)
            self.chunked.popleft()
            self._finish(seq, "", error=f"prefill failed: the engine raised {type(exc).__name__} "
                                        "on this prompt (details in the server log)")
            return
        self.stats.prefill_exec_s += time.perf_counter() - t
        self.stats.prefill_chunks += 1
        entry[1] = end
        if self.prefixes is not None:
            self.prefixes.prefilled(seq.slot, seq.prompt_ids[:end])  # a prefill's KV, reusable as such
        if end < n:
            return
        self.chunked.popleft()
        timeline.mark("computed", seq.request_id)
        self.stats.prefills += 1
        self.stats.prefill_calls += 1
        if self.prefixes is not None and seq.reused:
            self._count_reuse([seq])
        self.running.append(seq)
        token, seq.failure = choose_safely(seq.sampler, logits)
        if not self._advance(seq, token):
            self.running.remove(seq)
        self.stats.prefill_s += time.perf_counter() - t

    def _prefill(self, batch: list[Sequence]):
        """Prefill `batch` in one engine call; if that fails, each prompt alone, so that a prompt
        that breaks the engine fails alone. Returns the sequences that got logits, and the logits."""
        fresh = [s for s in batch if not s.reused]
        if fresh and len(fresh) < len(batch):
            # the prompts with nothing cached in one batched prefill, the others on their cached
            # prefixes: an engine may run those one at a time (ONNX Runtime's fused graph must), and
            # a whole admission sent that way made every prompt of it wait for the others
            cached = [s for s in batch if s.reused]
            got_fresh, rows_fresh = self._prefill(fresh)
            got_cached, rows_cached = self._prefill(cached)
            return got_fresh + got_cached, list(rows_fresh) + list(rows_cached)
        slots, prompts = [s.slot for s in batch], [s.prompt_ids for s in batch]
        try:
            if any(s.reused for s in batch):
                return batch, self.engine.prefill_cached(slots, prompts, [s.reused for s in batch])
            return batch, self.engine.prefill_batch(slots, prompts)
        except Exception as exc:  # noqa: BLE001
            log.exception("prefill of %d prompts failed%s", len(batch), "; retrying each alone" if len(batch) > 1 else "")
            if len(batch) == 1:
                self._finish(batch[0], "", error=f"prefill failed: the engine raised {type(exc).__name__} "
                                                 "on this prompt (details in the server log)")
                return [], []
        ok, rows = [], []
        for seq in batch:
            got, logits = self._prefill([seq])
            if got:
                ok.append(seq)
                rows.append(logits[0])
        return ok, rows

    def _drop_timed_out(self) -> None:
        """Refuse the requests that waited longer than `queue_timeout` for a slot (oldest first)."""
        limit = time.perf_counter() - self.queue_timeout
        while True:
            with self._cv:
                if not self.waiting or self.waiting[0].arrived > limit:
                    return
                seq = self.waiting.popleft()
            waited = 1e3 * (time.perf_counter() - seq.arrived)
            if self.metrics:
                self.courier.call(lambda: self.metrics.rejected("queue_timeout"))
                self._report(0, 0)
            self._finish(seq, "", error=f"generator queue: timed out after waiting {waited:.0f} ms for a KV-cache slot "
                                        f"(queue_timeout_ms {1e3 * self.queue_timeout:.0f}); retry later")

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
        """Give admitted sequences their slots (where prefixes are reused: with the KV of their
        longest cached prefix, prefix.py), samplers and limits."""
        t = time.perf_counter()
        for seq in batch:
            timeline.mark("admitted", seq.request_id)
            if self.prefixes is None:
                seq.slot = self.free_slots.pop()
            else:
                seq.slot, seq.reused, source = self.prefixes.take(self.free_slots, seq.prompt_ids)
                if source is not None:
                    self._copy_prefix(seq, source)
            self.stats.queue_s += t - seq.arrived
            freed = self._freed_at.pop(seq.slot, None)
            if freed is not None:
                self.stats.slot_gap_s += t - freed
                self.stats.slot_gaps += 1
            if seq.sampler is None:
                seq.sampler = Sampler(seq.params, seq.prompt_ids, self.engine.vocab_size)
            if self.draw and seq.sampler.penalized and seq.sampler.drawable:
                self.engine.track(seq.slot, seq.prompt_ids)  # the engine's counts for its penalties
            seq.limit = min(seq.params.max_tokens, self.engine.max_seq_len - len(seq.prompt_ids))

    def _copy_prefix(self, seq: Sequence, source: int) -> None:
        """Copy the KV of `seq`'s cached prefix from slot `source` into its own; where that fails,
        its prompt is prefilled whole (the request must not be lost between the line and a slot)."""
        try:
            self.engine.copy_prefix(source, seq.slot, seq.reused)
            self.stats.copied_tokens += seq.reused
        except Exception:  # noqa: BLE001
            log.exception("copying %d cached tokens from slot %d to slot %d failed", seq.reused, source, seq.slot)
            self.prefixes.forget(seq.slot)
            seq.reused = 0

    def _count_reuse(self, batch: list[Sequence]) -> None:
        """The prefilled `batch`'s slots hold their prompts' KV now; count the tokens reused."""
        for seq in batch:
            self.prefixes.prefilled(seq.slot, seq.prompt_ids)
        reused = sum(s.reused for s in batch)
        if reused:
            self.stats.reused_tokens += reused
            self.stats.reused_prefills += sum(s.reused > 0 for s in batch)
            if self.metrics:
                self.courier.call(lambda: self.metrics.reused(reused))

    # -- admission: prompts inside a decode step (mix_prefill) ---------------------------
    def _mix_next(self) -> bool:
        """Will the next decode step carry the waiting requests? (Not when a running row needs the
        logits on the host, nor when the head of the line bans other end ids than the running rows.)"""
        ban = greedy_ban([s.sampler for s in self.running], draw=self.draw)
        return ban is not False and self._mix_due(ban_key(self.running, ban))

    def _mix_due(self, key=None) -> bool:
        """Admit the waiting requests inside the next decode step (rather than a prefill of their own)?"""
        if not (self.mix_prefill and self.running and self._admission_due()):
            return False
        with self._cv:
            head = self.waiting[0] if self.waiting else None
        return head is not None and self._mixable(head, key)

    def _mixable(self, seq: Sequence, key) -> bool:
        """Can `seq` be prefilled inside a decode step whose banned rows ban `key`?"""
        if seq.sampler is None:
            seq.sampler = Sampler(seq.params, seq.prompt_ids, self.engine.vocab_size)
        s = seq.sampler
        return ((s.argmax_only or self.draw and s.drawable)
                and len(seq.prompt_ids) <= min(self.engine.mix_tokens, self.prefill_token_budget)
                and (key is None or not s.end_key or s.p.min_tokens <= 0 or s.end_key == key))

    def _pop_mix(self, key=None) -> list[Sequence]:
        """Take the waiting requests a decode step will carry (free slots, the engine's prompt
        and token caps, greedy or drawn by the engine, bans compatible with `key`); they join `running`
        now and get their first token from that step."""
        batch = self._pop_waiting(min(len(self.free_slots), self.engine.mix_prompts),
                                  min(self.engine.mix_tokens, self.prefill_token_budget),
                                  lambda seq: self._mixable(seq, key))
        if batch:
            self._place(batch)  # on the KV of its longest cached prefix, as a prefill of its own
            if self.prefixes is not None:  # by the prefill kernels, in the step: reusable as a prefill's
                self._count_reuse(batch)
            self.running.extend(batch)
            self.stats.prefills += len(batch)
            self.stats.mixed_steps += 1
        return batch

    # -- accounting: tokens in, outputs out ----------------------------------------------
    def _take(self, rows: list[Sequence], tokens: list[int], new: list[Sequence] = ()) -> int:
        """Account one step's tokens (those of `rows`, then the first tokens of the `new`
        sequences it prefilled); rows of sequences that ended meanwhile are dropped. Returns how
        many sequences ended."""
        t = time.perf_counter()
        for seq in new:
            timeline.mark("computed", seq.request_id)
        try:
            return self._account(rows, tokens, new)
        finally:
            self.stats.bookkeeping_s += time.perf_counter() - t

    def _account(self, rows: list[Sequence], tokens: list[int], new=()) -> int:
        live = [(s, t) for s, t in zip(rows, tokens) if s.slot >= 0]
        self.stats.steps += 1
        self.stats.batch_size_sum += len(live)
        self._now = time.perf_counter()
        if self.stream_rate > 0:
            self._interval = max(self.stream_interval, sum(s.stream for s, _ in live) / self.stream_rate)
        done = {id(s) for s, t in live if not self._advance(s, t)}
        done |= {id(s) for s, t in zip(new, tokens[len(rows):]) if not self._advance(s, t)}
        if done:
            self.running = [s for s in self.running if id(s) not in done]
        if self.metrics:
            self._report(len(live) + len(new), 1)
        return len(done)

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Account one sampled token; return False when the sequence finished."""
        if token < 0:  # this row's logits or sampling failed: the request fails alone
            self._finish(seq, "", error=seq.failure or NONFINITE_MESSAGE)
            return False
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
                    self.courier.post(seq, Output(rel, len(seq.prompt_ids), seq.generated, urgent=first))
        return True

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.slot >= 0:
            if error and self.prefixes is not None:
                self.prefixes.forget(seq.slot)  # a failed prefill or step may have left bad KV
            self.engine.release(seq.slot)
            self.free_slots.append(seq.slot)
            self._freed_at[seq.slot] = time.perf_counter()
            seq.slot = -1
        self.stats.finished += 1
        if self.metrics:
            e2e = time.perf_counter() - seq.arrived
            # the request's mean time between tokens after the first (None for fewer than two)
            itl = ((time.perf_counter() - seq.first_token_at) / (seq.generated - 1)
                   if seq.first_token_at is not None and seq.generated > 1 else None)
            self.courier.call(lambda: self.metrics.finished(reason, e2e, itl))
        rel = None if error else seq.tracker.final()
        self.courier.post(seq, Output(rel, len(seq.prompt_ids), seq.generated, reason, final=True, error=error))

    def _drop_cancelled(self) -> None:
        for entry in [c for c in self.chunked if c[0].cancelled]:  # a long prompt between two pieces
            self.chunked.remove(entry)
            self.stats.cancelled += 1
            self._finish(entry[0], "cancelled")
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
        if self.metrics:  # the running gauge must not keep a cancelled sequence (at once when none runs)
            self._report(0, 0)

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
