"""`ensemble`: the public entry model. A decoupled Python model that runs the pipeline itself
(preprocessing -> generator -> postprocessing, with BLS: flow.py; `tokenize: entry` prepares the
prompt here and `detokenize: generator` has the generator send the text), so that a client's
cancellation reaches the generator, and that checks every input before any work (limits.py).
With `generate: entry` it runs the generator's engine in its own process instead of calling the
generator model (one instance then: one process holds the engine).

Overload: at most `max_in_flight` requests run at once in each instance (the generator's slots plus
its waiting line, shared by the instances). Beyond that, `execute` blocks; Triton's queue in front
of this model (dynamic batcher, `max_queue_size`) then fills and Triton itself refuses the next
request in about a millisecond with UNAVAILABLE: HTTP 503 (over a gRPC stream: an error message
"Exceeds maximum queue size", Triton 2.51 sends no status code inside a stream). A Python model
cannot choose its error codes in Triton 2.51 (the backend drops them: every error is HTTP 400), so
the server's own queue is the only way to a real 503.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import triton_io as io
from .flow import GEN_INPUTS, Context, Flow, Watcher
from .limits import Limits
from .manifest import verify_model_dir
from .metrics import EntryMetrics
from .prompt import Prompter


class Capacity:
    """A counting gate: `acquire` blocks while `limit` requests run."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.used = 0
        self._cv = threading.Condition()

    def acquire(self) -> None:
        with self._cv:
            while self.used >= self.limit:
                self._cv.wait()
            self.used += 1

    def release(self) -> None:
        with self._cv:
            self.used -= 1
            self._cv.notify()


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = io.model_setup(args)
        self.model_name = args["model_name"]
        self.capacity = Capacity(int(params.get("max_in_flight", "272")))
        metrics = EntryMetrics(self.model_name, restarts=int(os.environ.get("TRITONCHAT_SERVER_RESTARTS", "0") or 0))
        limits = Limits.from_params(params)
        # tokenize: entry -> the prompt is prepared here (its own tokenizer copy, written by the build)
        prompter = Prompter(version_dir / "tokenizer", limits) if params.get("tokenize") == "entry" else None
        self.ctx = Context(limits=limits, prompter=prompter,
                           watcher=Watcher(float(params.get("cancel_poll_ms", "20")) / 1e3),
                           metrics=metrics, known_inputs={i["name"] for i in config["input"]},
                           log_requests=float(params.get("log_requests", "0") or 0),
                           text_from_generator=params.get("detokenize", "postprocessing") == "generator",
                           generator=self._own_generator(args, params) if params.get("generate") == "entry" else None,
                           gen_inputs=self._generator_inputs(args))
        # one thread per request in flight: each waits on its BLS calls (which release the GIL)
        self.pool = ThreadPoolExecutor(max_workers=self.capacity.limit, thread_name_prefix="tritonchat-flow")

    @staticmethod
    def _generator_inputs(args) -> tuple:
        """The client inputs a generator call carries: GEN_INPUTS less those the generator's config does
        not declare (a repository built before `apply_chat_template` reached the generator)."""
        try:
            declared = io.config_inputs(Path(args["model_repository"]).parent / "generator")
        except OSError:  # no generator folder beside this model: its calls fail on their own, saying so
            return GEN_INPUTS
        return tuple(n for n in GEN_INPUTS if n in declared)

    def _own_generator(self, args, params: dict):
        """`generate: entry`: the generator model's engine, built here from its folder and settings
        (its config.pbtxt; that model itself then only points requests here). Its courier polls the
        clients' cancellation as often as this model's flows would (`cancel_poll_ms`). Imported here: the
        default entry's processes need none of the engine's modules."""
        from .generator import Generator

        gen_dir = Path(args["model_repository"]).parent / "generator"
        verify_model_dir(gen_dir, "1")
        gen_params = io.config_params(gen_dir)
        gen_params["cancel_poll_ms"] = params.get("cancel_poll_ms", "20")
        return Generator(gen_params, gen_dir / "1", self.model_name)

    def execute(self, requests):
        for request in requests:
            self.capacity.acquire()  # blocks at capacity: Triton's queue fills and refuses (503)
            self.ctx.metrics.in_flight(+1)
            # the sender is taken in `execute`: one taken later, on another thread, sends fine but
            # never reports the client's cancellation
            self.pool.submit(self._run, request, request.get_response_sender())
        return None

    def _run(self, request, sender) -> None:
        try:
            Flow(request, sender, self.ctx).run()
        finally:
            self.capacity.release()
            self.ctx.metrics.in_flight(-1)

    def finalize(self):
        if self.ctx.generator is not None:
            self.ctx.generator.shutdown()
        self.ctx.watcher.stop()
        self.ctx.metrics.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
