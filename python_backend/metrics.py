"""The generator's and the entry's metrics on Triton's Prometheus endpoint (`:8002/metrics`), via
pb_utils.MetricFamily."""

from __future__ import annotations

import queue
import threading

import triton_python_backend_utils as pb_utils

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]


class GeneratorMetrics:
    """Implements the scheduler's metrics hooks (`step`, `first_token`, `finished`, `reused`), which the
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
            F("tritonchat_inter_token_seconds", "Mean time between two tokens of a request, after its first "
              "(one observation per request of two tokens or more)", F.HISTOGRAM),
            F("tritonchat_rejected_requests_total", "Requests the generator refused: its waiting line was full "
              "(queue_full) or they waited longer than queue_timeout_ms (queue_timeout)", F.COUNTER),
            F("tritonchat_prefix_reused_tokens_total", "Prompt tokens not computed again: their KV was still in "
              "the cache from an earlier request with the same prefix (prefix reuse)", F.COUNTER),
        ]
        running, waiting, tokens, steps, self._requests, ttft, e2e, itl, self._rejected, reused = self._families
        self.running = running.Metric(labels=labels)
        self.waiting = waiting.Metric(labels=labels)
        self.tokens = tokens.Metric(labels=labels)
        self.steps = steps.Metric(labels=labels)
        self.ttft = ttft.Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.e2e = e2e.Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.itl = itl.Metric(labels=labels, buckets=ITL_BUCKETS)
        self.reused_tokens = reused.Metric(labels=labels)
        self._labels = labels
        self._by_reason = {}
        self._rejected_by = {}
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

    def finished(self, reason: str, seconds: float, itl: float | None = None) -> None:
        reason = reason or "error"
        if reason not in self._by_reason:
            self._by_reason[reason] = self._requests.Metric(labels={**self._labels, "reason": reason})
        self._by_reason[reason].increment(1)
        self.e2e.observe(seconds)
        if itl is not None:
            self.itl.observe(itl)

    def reused(self, tokens: int) -> None:
        self.reused_tokens.increment(tokens)

    def rejected(self, reason: str) -> None:
        if reason not in self._rejected_by:
            self._rejected_by[reason] = self._rejected.Metric(labels={**self._labels, "reason": reason})
        self._rejected_by[reason].increment(1)


class EntryMetrics:
    """The entry model's metrics: requests in flight, client cancellations, errors by kind, and the
    server restarts the supervisor counted (`tritonchat serve` passes them in the environment).

    Every update is applied on one thread of its own: the entry's flows run on many threads, and
    metric calls into the server from several threads at once broke the stub's shared-memory lock
    (`boost::interprocess::lock_exception`, then a crash of tritonserver; the generator sends its
    metrics from its courier thread for the same reason)."""

    def __init__(self, model_name: str, restarts: int = 0):
        labels = {"model": model_name}
        F = pb_utils.MetricFamily
        self._families = [
            F("tritonchat_entry_in_flight", "Requests in the entry model (preprocessing, generator, postprocessing)",
              F.GAUGE),
            F("tritonchat_cancelled_requests_total", "Requests whose client cancelled or went away", F.COUNTER),
            F("tritonchat_request_errors_total", "Requests answered with an error, by kind", F.COUNTER),
            F("tritonchat_server_restarts", "Times `tritonchat serve` restarted tritonserver after a fault", F.GAUGE),
        ]
        in_flight, cancelled, self._errors, restarts_family = self._families
        self._labels = labels
        self._in_flight = in_flight.Metric(labels=labels)
        self._cancelled = cancelled.Metric(labels=labels)
        self._by_kind = {}
        self._restarts = restarts_family.Metric(labels=labels)  # kept: a dropped Metric leaves the family
        self._restarts.set(restarts)  # every instance sets the same value
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._apply, name="tritonchat-entry-metrics", daemon=True)
        self._thread.start()

    def in_flight(self, change: int) -> None:
        """A request entered (+1) or left (-1). Changes, not values: the entry's instances are
        processes that share one series per label set (Triton keeps one), so each adds its own. (A
        stub that died with requests in flight leaves them counted: `tritonchat serve` restarts the
        whole server on a dead stub, which starts the gauge again at 0.)"""
        self._todo.put(("in_flight", change))

    def cancelled(self) -> None:
        self._todo.put(("cancelled", None))

    def error(self, kind: str) -> None:
        self._todo.put(("error", kind))

    def stop(self) -> None:
        self._todo.put(None)
        self._thread.join(5)

    def _apply(self) -> None:
        while (item := self._todo.get()) is not None:
            what, value = item
            try:
                if what == "in_flight":
                    while not self._todo.empty():  # one call for the changes queued together
                        nxt = self._todo.get()
                        if nxt is None or nxt[0] != "in_flight":
                            self._todo.put(nxt)  # keep it (order among other updates does not matter)
                            break
                        value += nxt[1]
                    if value:
                        self._in_flight.increment(value)
                elif what == "cancelled":
                    self._cancelled.increment(1)
                else:
                    m = self._by_kind.get(value)
                    if m is None:
                        m = self._by_kind[value] = self._errors.Metric(labels={**self._labels, "kind": value})
                    m.increment(1)
            except Exception:  # noqa: BLE001 - a metric must never stop the entry
                pass
