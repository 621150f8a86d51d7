"""One request's way through the pipeline, run by the entry model on a worker thread:
preprocessing (BLS; with `tokenize: entry` done here, prompt.py) -> generator (BLS, decoupled: a
stream of responses) -> postprocessing (BLS, one call per generator response; with `detokenize:
generator` the generator sends the text itself) -> the client. And the watcher that notices a client went away.
With `generate: entry` the engine runs in the entry's own process (`Context.generator`): the flow
hands its sequence to the scheduler, whose courier sends each response straight to the client and
polls the client's cancellation itself (one process hop per response instead of two).

Why BLS and not a Triton ensemble: Triton checks an ensemble's cancellation only between its
steps, never inside the running decoupled generator step, so a cancelled stream (gRPC cancel,
channel close, HTTP disconnect) kept its KV slot until max_tokens. Here the entry polls its own
request's cancellation and tells the generator, which frees the slot at its next step boundary.
Triton 2.51's Python backend cannot cancel a BLS request (its response iterator has no cancel),
so the telling is a control request to the generator naming the generation request's id
(docs/contract.md, "Cancellation").
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from . import limits, timeline
from .batching.sampling import InvalidParameter
from .prompt import Prompter, prompt_tensors
from .batching.sequence import QueueFull
from .request import ENTRY_ID_PREFIX, sequence_of

log = logging.getLogger("tritonchat.entry")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

PRE_INPUTS = ("text_input", "apply_chat_template", "stop_words", "bad_words")
PRE_OUTPUTS = ["input_ids", "input_length", "bad_words_ids"]
GEN_INPUTS = ("max_tokens", "stop_words", "stream", "temperature", "top_k", "top_p", "repetition_penalty",
              "presence_penalty", "frequency_penalty", "seed", "min_tokens", "end_id", "pad_id",
              "exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens",
              "apply_chat_template")  # the generator: where a prompt was a chat, its answer's text starts alone
GEN_OUTPUTS = ["tokens", "read_offset", "trim_chars", "num_input_tokens", "num_output_tokens", "finish_reason"]
OUTPUTS = ["text_output", "output_ids", "num_input_tokens", "num_output_tokens", "finish_reason"]


class Watcher:
    """Asks the entry's in-flight requests about cancellation, on one thread, and cancels each
    cancelled one once (`Flow.cancel`).

    Never two calls to the server about one request at once: a flow polls itself before each send,
    and the watcher polls only flows that are not sending (it skips a flow whose lock is taken);
    talking to the server about one request from two threads at once lost cancellations. A flow is
    forgotten, under its lock, before its final response: asking a request about cancellation after
    its final response crashes tritonserver (the response factory is freed with it).

    It also holds each finished generator stream (the BLS response iterator) for RETIRE_S before
    dropping it (`retire`): an iterator freed as soon as its last response is read crashed the
    24.10 stub now and then (SIGSEGV in a thread of its own, or SIGABRT; about 1 hot update in 3 under
    streaming traffic once the entry answered the generator's last response at once, without a
    postprocessing call in between; 8 of 8 passed holding them; docs/operations.md)."""

    RETIRE_S = 1.0

    def __init__(self, interval: float):
        self.interval = interval
        self._flows: dict[int, "Flow"] = {}
        self._retired: collections.deque = collections.deque()  # (when, iterator), oldest first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tritonchat-entry-watcher", daemon=True)
        self._thread.start()

    def watch(self, flow: "Flow") -> None:
        self._flows[id(flow)] = flow  # a dict write: atomic under the GIL

    def forget(self, flow: "Flow") -> None:
        with flow.io:  # waits for a poll of this flow in progress; no poll starts after this
            self._flows.pop(id(flow), None)

    def retire(self, stream) -> None:
        """Keep a finished BLS response iterator for RETIRE_S, then let it go (see the class)."""
        self._retired.append((time.perf_counter(), stream))  # deque appends: atomic under the GIL

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            while self._retired and now - self._retired[0][0] > self.RETIRE_S:
                self._retired.popleft()
            for key, flow in list(self._flows.items()):
                if now - flow.polled < self.interval:
                    continue  # it asked itself lately, between two of its sends
                if not flow.io.acquire(blocking=False):
                    continue  # it is sending: it polls itself before its next send
                try:
                    flow.polled = now
                    gone = key in self._flows and _safe(flow.sender.is_cancelled)
                    if gone:
                        self._flows.pop(key, None)
                finally:
                    flow.io.release()
                if gone:
                    try:
                        flow.cancel()
                    except Exception:  # noqa: BLE001 - a failed cancel must not stop the watcher
                        log.exception("could not cancel a generation request")


def _safe(fn) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001
        return False


@dataclasses.dataclass
class Context:
    """What every flow shares (built once by the entry model)."""

    limits: limits.Limits
    watcher: Watcher
    metrics: object  # EntryMetrics
    known_inputs: set
    log_requests: float = 0.0  # fraction of requests that get a log line
    # `detokenize: generator`: the generator's responses carry the text (request.send), forwarded as
    # they are; else each goes through a postprocessing call
    text_from_generator: bool = False
    # `tokenize: entry`: the entry prepares the prompt itself (prompt.py), no preprocessing call
    prompter: Prompter | None = None
    # `generate: entry`: the engine in this process (generator.Generator), no generator BLS call
    generator: object | None = None
    # what a generator call carries of the client's inputs: those of GEN_INPUTS its config declares (a
    # repository built before an input was added still serves under newer code; Triton refuses an
    # input a model does not declare)
    gen_inputs: tuple = GEN_INPUTS


class Flow:
    def __init__(self, request, sender, ctx: Context):
        self.request = request
        self.ctx = ctx
        self.sender = sender
        self.gen_id = ENTRY_ID_PREFIX + uuid.uuid4().hex
        self.started = time.perf_counter()
        self.first_at: float | None = None
        self.tokens_in = self.tokens_out = 0
        self.finish_reason = ""
        self.error_kind = ""
        self.cancelled = False
        self.io = threading.Lock()  # held while this flow's request is asked or sent anything (Watcher)
        # when its request was last asked about cancellation (by the flow or the watcher): its arrival,
        # so that a first token due within `cancel_poll` goes out without a round trip to the server first
        self.polled = self.started

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> None:
        final = None
        timeline.mark("entry_start", self.gen_id)
        try:
            inputs = {t.name(): t for t in self.request.inputs()}
            limits.unknown_parameters(self.request, self.ctx.known_inputs)
            limits.check_public(inputs, self.ctx.limits)
            pre = self._preprocess(inputs)
            timeline.mark("prompt_ready", self.gen_id)
            if self.ctx.generator is not None:
                final = self._generate_here(inputs, pre)
            else:
                self.ctx.watcher.watch(self)
                final = self._generate(inputs, pre)
        except InvalidParameter as exc:
            final = self._error(str(exc), "invalid_argument")
        except Exception:  # noqa: BLE001 - a bug or a broken model must not leave the client hanging
            log.exception("entry: request %s failed", self.gen_id)
            final = self._error(f"internal error in the entry model (request {self.gen_id}; see the server log)",
                                "internal")
        finally:
            self.ctx.watcher.forget(self)  # before the final response (see Watcher)
            if final is not None:
                self._send(final, FINAL)
            elif self.ctx.generator is None:  # every request ends with a final response (the engine's courier
                # sent it where the engine runs here: `_generate_here` returns None only after that)
                try:
                    self.sender.send(flags=FINAL)
                except Exception:  # noqa: BLE001
                    pass
            self._account()

    def _preprocess(self, inputs: dict):
        if self.ctx.prompter is not None:
            try:
                ids, bad = self.ctx.prompter.prepare(inputs)
            except InvalidParameter:
                raise
            except Exception as exc:  # noqa: BLE001 - as preprocessing answers it: this prompt fails alone
                log.exception("entry: could not prepare the prompt of %s", self.gen_id)
                raise InvalidParameter(f"could not prepare this prompt ({type(exc).__name__})") from None
            return prompt_tensors(ids, bad)
        req = pb_utils.InferenceRequest(model_name="preprocessing", requested_output_names=PRE_OUTPUTS,
                                        inputs=[inputs[n] for n in PRE_INPUTS if n in inputs])
        resp = req.exec()
        if resp.has_error():
            raise InvalidParameter(resp.error().message())
        return [pb_utils.get_output_tensor_by_name(resp, n) for n in PRE_OUTPUTS]

    def _generate(self, inputs: dict, pre: list):
        """Stream the generator's responses through postprocessing to the client; return the
        last response's tensors (sent with the FINAL flag by `run`), or None when it was sent."""
        gen_in = pre + [inputs[n] for n in self.ctx.gen_inputs if n in inputs]
        direct = self.ctx.text_from_generator
        stream = pb_utils.InferenceRequest(model_name="generator", requested_output_names=OUTPUTS if direct
                                           else GEN_OUTPUTS, inputs=gen_in, request_id=self.gen_id).exec(decoupled=True)
        try:
            for g in stream:
                if g.has_error():
                    msg = g.error().message()
                    return self._error(msg, _kind_of(msg))
                tensors = g.output_tensors()
                if not tensors:
                    continue  # the empty final response of a generator that already sent its last one
                # direct: the generator's response holds just the entry's OUTPUTS (it asked for those)
                out = tensors if direct else self._postprocess(tensors)
                reason = _value(out, "finish_reason")
                first = self.first_at is None
                if first:
                    self.first_at = time.perf_counter()
                    timeline.mark("entry_got", self.gen_id)
                if reason:  # the generator's final response: the entry's too
                    self.finish_reason = reason
                    self.tokens_in = int(_value(out, "num_input_tokens") or 0)
                    self.tokens_out = int(_value(out, "num_output_tokens") or 0)
                    return out
                if self._client_gone():
                    self.cancel()
                self._send(out, 0)
                if first:
                    timeline.mark("entry_sent", self.gen_id)
            return None
        finally:
            self.ctx.watcher.retire(stream)  # not freed right after its last response (Watcher)

    def _generate_here(self, inputs: dict, pre: list):
        """`generate: entry`: run the request on this process's engine. Its courier sends every
        response (the final one too) to the client and polls the client's cancellation (the watcher
        stays out: never two threads asking about one request); this thread waits for the end."""
        gen = self.ctx.generator
        done = threading.Event()
        seq = None

        def on_final(out) -> None:  # on the courier's thread, once the final response's send ended
            try:
                if out.error:
                    self.error_kind = _kind_of(out.error)
                    self.ctx.metrics.error(self.error_kind)
                self.finish_reason = out.finish_reason
                self.cancelled = out.finish_reason == "cancelled"
                if self.cancelled:
                    self.ctx.metrics.cancelled()
                self.tokens_in, self.tokens_out = out.num_input_tokens, out.num_output_tokens
                if seq.first_token_at is not None:
                    self.first_at = seq.first_token_at
            finally:
                done.set()

        gen_inputs = {n: inputs[n] for n in GEN_INPUTS if n in inputs} | {t.name(): t for t in pre}
        seq = sequence_of(gen_inputs, self.sender, request_id=self.gen_id,
                          outputs=set(self.request.requested_output_names()), tokenizer=gen.tokenizer,
                          end_ids=gen.end_ids, limits=gen.limits, is_cancelled=self.sender.is_cancelled,
                          on_final=on_final)
        try:
            gen.submit(seq)
        except QueueFull as exc:
            return self._error(str(exc), "unavailable")
        timeline.mark("gen_submitted", self.gen_id)
        done.wait()
        return None

    def _postprocess(self, tensors: list):
        req = pb_utils.InferenceRequest(model_name="postprocessing", requested_output_names=OUTPUTS, inputs=tensors)
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(f"postprocessing failed: {resp.error().message()}")
        return [pb_utils.get_output_tensor_by_name(resp, n) for n in OUTPUTS]

    def _client_gone(self) -> bool:
        """Poll our own request (at most every `cancel_poll`), between two sends."""
        now = time.perf_counter()
        if self.cancelled or now - self.polled < self.ctx.watcher.interval:
            return False
        self.polled = now
        timeline.mark("entry_poll", self.gen_id)
        with self.io:
            return _safe(self.sender.is_cancelled)

    def cancel(self) -> None:
        """The client went away: tell the generator (a control request naming ours), which ends
        the sequence at its next step boundary and sends its final response (reason cancelled)."""
        with self.io:  # the watcher and this flow may both see the client go
            if self.cancelled:
                return
            self.cancelled = True
        self.ctx.metrics.cancelled()
        ctl = pb_utils.InferenceRequest(
            model_name="generator", requested_output_names=GEN_OUTPUTS, request_id=self.gen_id,
            inputs=[pb_utils.Tensor("input_ids", np.zeros((1, 1), np.int32)),
                    pb_utils.Tensor("input_length", np.ones((1, 1), np.int32)),
                    pb_utils.Tensor("max_tokens", np.ones((1, 1), np.int32)),
                    pb_utils.Tensor("cancel", np.ones((1, 1), np.bool_))])
        replies = ctl.exec(decoupled=True)
        for _ in replies:
            pass
        self.ctx.watcher.retire(replies)

    # -- responses ------------------------------------------------------------------------------
    def _send(self, out, flags: int) -> None:
        """Send `out` (a list of output tensors, or an error). The list is held until `send`
        returns: the 24.10 stub's send releases the GIL and drops the outputs the client did not ask
        for; a Tensor whose last reference were inside the response would be freed without the GIL
        (heap corruption; see request.send)."""
        response = (pb_utils.InferenceResponse(output_tensors=[], error=out) if isinstance(out, pb_utils.TritonError)
                    else pb_utils.InferenceResponse(output_tensors=out))
        try:
            with self.io:
                self.sender.send(response, flags=flags)
        except Exception:  # noqa: BLE001 - a client that went away
            if not self.cancelled:
                log.warning("entry: could not send a response of %s", self.gen_id)
        del response

    def _error(self, message: str, kind: str):
        self.error_kind = kind
        self.ctx.metrics.error(kind)
        return pb_utils.TritonError(message)

    def _account(self) -> None:
        if self.cancelled and not self.finish_reason:
            self.finish_reason = "cancelled"
        rate = self.ctx.log_requests
        if rate > 0 and (rate >= 1 or random.random() < rate):
            now = time.perf_counter()
            pb_utils.Logger.log_info("request " + json.dumps({
                "id": self.gen_id, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "ttft_ms": round(1e3 * (self.first_at - self.started), 2) if self.first_at else None,
                "duration_ms": round(1e3 * (now - self.started), 2),
                "finish_reason": self.finish_reason or None, "error_kind": self.error_kind or None,
                "cancelled": self.cancelled}, separators=(",", ":")))


def _value(tensors: list, name: str):
    """The first value of output `name` (str for bytes), or None."""
    for t in tensors:
        if t is not None and t.name() == name:
            v = t.as_numpy().reshape(-1)
            if not len(v):
                return None
            return v[0].decode("utf-8") if isinstance(v[0], bytes) else v[0]
    return None


def _kind_of(message: str) -> str:
    """The error kind a generator message reports (metrics and the request log)."""
    m = message.lower()
    if "queue is full" in m or "timed out" in m or "shutting down" in m:
        return "unavailable"
    if "non-finite" in m:
        return "nan_logits"
    if "prefill failed" in m:
        return "prefill"
    if "sampling failed" in m:
        return "sampling"
    if "generator failed" in m or "engine" in m:
        return "engine"
    return "invalid_argument"
