"""What the scheduler and the courier pass around: a request (`Sequence`), a response (`Output`),
and the counters both keep for the generator's log at shutdown (`Stats`).

None of it knows Triton: a sequence carries a `sink` callable that receives its `Output`s and an
`is_cancelled` callable (`python_backend/request.py` builds both from a Triton request).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from .detokenize import Release, TextTracker
from .sampling import Sampler, SamplingParams


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
    request_id: str = ""  # the Triton request's (timeline marks)
    # runtime state
    slot: int = -1
    sampler: Sampler | None = None
    limit: int = 0  # tokens it may generate: max_tokens, or fewer where the context ends first
    reused: int = 0  # prompt tokens whose KV its slot held before its prefill (prefix reuse)
    generated: int = 0
    last_token: int = -1
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_sent: float = 0.0  # when the last streamed response left the loop
    cancelled: bool = False  # raised by the courier (or the generator, for the entry's requests)
    failure: str | None = None  # why this row's last token could not be chosen (its request fails alone)


@dataclasses.dataclass
class Stats:
    """The scheduler's and the courier's counters and time split, logged by the generator at
    shutdown. (The Prometheus metrics are the other flow: the scheduler's `metrics` hooks, called on
    the courier's thread; see `python_backend/metrics.py`.)"""

    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    batch_size_sum: int = 0
    chained: int = 0  # steps launched before the host had the previous step's tokens
    prefill_calls: int = 0
    prefill_chunks: int = 0  # pieces of long prompts run between decode steps (prefill_chunk)
    mixed_steps: int = 0  # decode steps that carried prompts (prefilled inside the step)
    drawn: int = 0  # sampled tokens the engine drew itself (sample_on_device), not the host's sampler
    # prefix reuse: prompt tokens whose KV was reused (copied from another slot: `copied_tokens` of
    # them), and the prefills that reused some
    reused_tokens: int = 0
    reused_prefills: int = 0
    copied_tokens: int = 0
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
    # metric updates (each a message to the server process) and the time they took
    metric_calls: int = 0
    metric_s: float = 0.0
    # cancellation polls (one per watched sequence and round) and the time they took
    polls: int = 0
    poll_s: float = 0.0

    def summary(self) -> dict:
        """Counters and time split, for the log at shutdown."""
        out = dataclasses.asdict(self)
        out["avg_batch"] = round(self.batch_size_sum / self.steps, 2) if self.steps else 0.0
        calls = self.prefill_calls + self.mixed_steps
        out["prompts_per_prefill"] = round(self.prefills / calls, 2) if calls else 0.0
        # per decode step: its launch on the host, the wait for its tokens
        for key in ("launch", "decode_wait"):
            out[f"{key}_ms_mean"] = round(1e3 * getattr(self, f"{key}_s") / self.steps, 3) if self.steps else 0.0
        out["queue_ms_mean"] = round(1e3 * self.queue_s / self.prefills, 2) if self.prefills else 0.0
        out["slot_gap_ms_mean"] = round(1e3 * self.slot_gap_s / self.slot_gaps, 2) if self.slot_gaps else 0.0
        out["send_lag_ms_mean"] = round(1e3 * self.send_lag_s / self.sends, 2) if self.sends else 0.0
        out["send_ms_mean"] = round(1e3 * self.send_s / self.sends, 3) if self.sends else 0.0
        out["metric_ms_mean"] = round(1e3 * self.metric_s / self.metric_calls, 3) if self.metric_calls else 0.0
        out["poll_ms_mean"] = round(1e3 * self.poll_s / self.polls, 3) if self.polls else 0.0
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
