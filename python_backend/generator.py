"""`generator`: decoupled model that runs the engine in-process with continuous batching.

`execute` only parses and validates each request (request.py) and hands it to the scheduler
thread (batching/scheduler.py); the scheduler's courier sends the responses (one per released
piece of text when streaming, else one) through the request's response sender, and polls
cancellation, which the scheduler reads before every step.

`Generator` is that engine with its scheduler, built from the model's parameters. With
`models.ensemble.generate: entry` the entry model builds it in its own process instead (entry.py),
and this model only answers that requests go to `ensemble`.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

from . import faults
from . import timeline
from . import triton_io as io
from .allocator import keep_freed_memory
from .batching.sampling import InvalidParameter
from .batching.scheduler import Scheduler
from .batching.sequence import QueueFull, Sequence
from .cpus import usable_cpus
from .engines import create_engine, engine_options, parse_flag
from .limits import Limits
from .metrics import GeneratorMetrics
from .request import ENTRY_ID_PREFIX, FINAL, model_end_ids, reject, request_flag, to_sequence

#: the generator's metrics carry this model label wherever the engine runs (dashboards and alerts)
METRICS_MODEL = "generator"


class Generator:
    """The engine, its scheduler (continuous batching) and metrics, from the generator model's
    parameters and version folder (weights, tokenizer, generation config)."""

    def __init__(self, params: dict, version_dir: Path, model_name: str):
        # the stub's thread that takes new requests waits for the GIL behind the decode loop, the
        # courier and any senders; 5 ms (Python's own) unless set: 0.5 gained nothing on the H100
        # (docs/build-config.md)
        sys.setswitchinterval(float(params.get("gil_switch_ms", "5") or 5) / 1e3)
        self.model_name = model_name
        self.max_seq_len = int(params["max_seq_len"])
        self.tokenizer = io.load_fast_tokenizer(version_dir)
        self.end_ids = model_end_ids(version_dir, self.tokenizer)
        self.engine = faults.wrap_from_env(create_engine(
            # `executor`: the name repositories built before this release used for the same parameter
            params.get("engine") or params.get("executor") or "onnxruntime",
            model_path=str(version_dir / params.get("model_file", "model.onnx")),
            max_slots=int(params.get("max_slots", "16")),
            max_seq_len=self.max_seq_len,
            threads=int(params.get("threads", "0")),
            device=params.get("device", "cpu"),
            dtype=params.get("dtype", "float32"),
            **engine_options(params),
        ))  # faults: the isolation tests' injected failures (off unless TRITONCHAT_FAULTS is set)
        self.engine.warmup()  # e.g. CUDA graphs of every batch size now, not on a user's request
        self.metrics = GeneratorMetrics(METRICS_MODEL)
        self.limits = Limits.from_params({**params, "vocab_size": str(self.engine.vocab_size)})
        senders = int(params.get("first_token_senders", "0") or 0)
        self.scheduler = Scheduler(self.engine, max_queue_size=int(params.get("max_waiting", "256")),
                                   queue_timeout=float(params.get("queue_timeout_ms", "0") or 0) / 1e3,
                                   prefill_token_budget=int(params.get("prefill_token_budget", "2048")),
                                   prefill_chunk=int(params.get("prefill_chunk", "0")),
                                   prefill_wait=float(params.get("prefill_wait_ms", "0")) / 1e3,
                                   stream_interval=float(params.get("stream_interval_ms", "0")) / 1e3,
                                   stream_rate=_stream_rate(params.get("stream_responses_per_s", "0")),
                                   mix_prefill=parse_flag(params.get("mix_prefill", "true")),
                                   sample_on_device=parse_flag(params.get("sample_on_device", "true")),
                                   prefix_reuse=parse_flag(params.get("prefix_reuse", "true")),
                                   first_senders=senders,
                                   # the entry's setting where it runs this engine (generate: entry)
                                   cancel_poll=float(params.get("cancel_poll_ms", "50") or 50) / 1e3,
                                   metrics=self.metrics)
        pb_utils.Logger.log_info(f"{model_name}: {json.dumps(self.engine.describe())}, "
                                 f"end ids {list(self.end_ids)}, first-token senders {senders}, "
                                 f"GIL switch interval {1e3 * sys.getswitchinterval():g} ms, "
                                 f"malloc keeps freed memory: {keep_freed_memory()}")

    def submit(self, seq: Sequence) -> None:
        """Into the scheduler's waiting line (QueueFull: the line is full; the metric is counted)."""
        try:
            self.scheduler.submit(seq)
        except QueueFull:
            self.scheduler.courier.call(lambda: self.metrics.rejected("queue_full"))
            raise

    def shutdown(self) -> None:
        self.scheduler.shutdown()
        summary = self.scheduler.stats.summary()
        captures = getattr(self.engine, "captures", None)  # CUDA graphs (torch engine)
        if captures:
            summary.update({f"graph_captures_{k}": round(v, 3) for k, v in captures.items()})
        stats = " ".join(f"{k}={v}" for k, v in summary.items())
        pb_utils.Logger.log_info(f"{self.model_name}: scheduler {stats}")  # key=value: the log escapes quotes


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = io.model_setup(args)
        self.model_name = args["model_name"]
        self.gen: Generator | None = None
        if params.get("generate") == "entry":  # the entry model runs the engine (see the module)
            pb_utils.Logger.log_info(f"{self.model_name}: the engine runs in the entry model (generate: entry)")
            return
        params.setdefault("max_slots", str(config.get("max_batch_size", 16) or 16))
        self.gen = Generator(params, version_dir, self.model_name)
        # generation requests of the entry model by request id (its cancellations name them), and
        # ids cancelled before their request arrived
        self.live: dict[str, object] = {}
        self.cancelled_early: collections.OrderedDict[str, None] = collections.OrderedDict()

    def execute(self, requests):
        gen = self.gen
        for request in requests:
            sender = request.get_response_sender()
            if gen is None:
                reject(sender, "this repository runs the engine inside the `ensemble` model "
                               "(models.ensemble.generate: entry): send requests to `ensemble`")
                continue
            rid = request.request_id() or ""
            timeline.mark("gen_execute", rid)
            try:
                if request_flag(request, "cancel"):
                    self._cancel(rid)
                    sender.send(flags=FINAL)
                    continue
                from_entry = rid.startswith(ENTRY_ID_PREFIX)
                seq = to_sequence(request, sender, tokenizer=gen.tokenizer, end_ids=gen.end_ids, limits=gen.limits,
                                  poll_cancel=not from_entry,
                                  on_final=(lambda out, rid=rid: self.live.pop(rid, None)) if from_entry else None)
                if from_entry:
                    self.live[rid] = seq
                    if self.cancelled_early.pop(rid, 0) is None:
                        seq.cancelled = True
                gen.submit(seq)
                timeline.mark("gen_submitted", rid)
            except InvalidParameter as exc:
                self.live.pop(rid, None)
                reject(sender, str(exc))
            except QueueFull as exc:
                self.live.pop(rid, None)
                reject(sender, str(exc), pb_utils.TritonError.UNAVAILABLE)
        return None

    def _cancel(self, rid: str) -> None:
        """A control request of the entry: its client went away. The scheduler ends the sequence at
        its next step boundary (or when it leaves the waiting line) and frees its slot."""
        seq = self.live.get(rid)
        if seq is not None:
            seq.cancelled = True
            self.gen.scheduler.wake()
            return
        self.cancelled_early[rid] = None  # its request is still on its way (or already finished)
        while len(self.cancelled_early) > 4096:
            self.cancelled_early.popitem(last=False)

    def finalize(self):
        if self.gen is not None:
            self.gen.shutdown()


AUTO_RATE_PER_CORE = 200.0  # each response costs CPU in postprocessing, Triton and the client
AUTO_RATE_MAX = 800.0  # each response is also sent from this process, under the decode loop's GIL


def _stream_rate(value: str) -> float:
    """`stream_responses_per_s`: a number, or "auto": 200 per CPU this process may use (`usable_cpus`:
    a pod's CPU limit, not the node's cores), at most 800. Per CPU: streaming then takes at most about
    half of it. At most 800: every response is also built and sent by this one process, under the GIL
    the decode loop needs (the measurements behind both numbers: docs/benchmarks-gpu.md, "Figures
    behind settings in the code")."""
    if str(value).strip().lower() == "auto":
        return min(AUTO_RATE_PER_CORE * usable_cpus(), AUTO_RATE_MAX)
    return float(value or 0)
