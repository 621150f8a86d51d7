"""Generator metrics on Triton's Prometheus endpoint (`:8002/metrics`), via pb_utils.MetricFamily."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class GeneratorMetrics:
    """Implements the scheduler's metrics hooks (`step`, `first_token`, `finished`), which the
    scheduler calls on its courier's thread (batching/courier.py: every call into the server
    process from one thread, off the decode loop). The shutdown log's counters are the other
    flow: `batching.sequence.Stats`."""

    def __init__(self, model_name: str):
        labels = {"model": model_name}
        F = pb_utils.MetricFamily
        self._families = [
            F("tritonchat_running_sequences", "Sequences in the running batch", F.GAUGE),
            F("tritonchat_waiting_requests", "Requests waiting for a KV-cache slot", F.GAUGE),
            F("tritonchat_generated_tokens_total", "Tokens generated", F.COUNTER),
            F("tritonchat_decode_steps_total", "Batched decode steps", F.COUNTER),
            F("tritonchat_requests_total", "Finished requests by finish reason", F.COUNTER),
            F("tritonchat_time_to_first_token_seconds", "Arrival at the generator to first token", F.HISTOGRAM),
            F("tritonchat_request_seconds", "Arrival at the generator to last token", F.HISTOGRAM),
        ]
        running, waiting, tokens, steps, self._requests, ttft, e2e = self._families
        self.running = running.Metric(labels=labels)
        self.waiting = waiting.Metric(labels=labels)
        self.tokens = tokens.Metric(labels=labels)
        self.steps = steps.Metric(labels=labels)
        self.ttft = ttft.Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.e2e = e2e.Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self._labels = labels
        self._by_reason = {}
        self._load = (-1, -1)

    def step(self, running: int, waiting: int, new_tokens: int, steps: int = 1) -> None:
        # each call is a message to the server process: only send what changed (the scheduler
        # also sums several decode steps into one call)
        if (running, waiting) != self._load:
            self._load = (running, waiting)
            self.running.set(running)
            self.waiting.set(waiting)
        if new_tokens:
            self.tokens.increment(new_tokens)
        if steps:
            self.steps.increment(steps)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, reason: str, seconds: float) -> None:
        reason = reason or "error"
        if reason not in self._by_reason:
            self._by_reason[reason] = self._requests.Metric(labels={**self._labels, "reason": reason})
        self._by_reason[reason].increment(1)
        self.e2e.observe(seconds)
