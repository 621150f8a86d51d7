"""`generator`: decoupled model that runs the engine in-process with continuous batching.

`execute` only parses and validates each request and hands it to the scheduler thread; the
scheduler sends the responses (one per released piece of text when streaming, else one) through
the request's response sender, and polls cancellation before every step.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from . import triton_io as io
from .allocator import keep_freed_memory
from .batching.detokenize import TextTracker
from .engines import create_engine
from .metrics import GeneratorMetrics
from .batching.sampling import InvalidParameter, SamplingParams
from .batching.scheduler import Output, QueueFull, Scheduler, Sequence

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        if os.environ.get("TRITONCHAT_FAULTHANDLER"):  # a file for the Python stacks of a crashing stub
            import faulthandler

            self._fault_file = open(os.environ["TRITONCHAT_FAULTHANDLER"], "a")
            faulthandler.enable(self._fault_file, all_threads=True)
        config, params, version_dir = io.model_setup(args)
        self.model_name = args["model_name"]
        self.max_seq_len = int(params["max_seq_len"])
        self.tokenizer = io.load_fast_tokenizer(version_dir)
        self.end_ids = _end_ids(version_dir, self.tokenizer)
        self.engine = create_engine(
            # `executor`: the name repositories built before this release used for the same parameter
            params.get("engine") or params.get("executor") or "onnxruntime",
            model_path=str(version_dir / params.get("model_file", "model.onnx")),
            max_slots=int(params.get("max_slots", config.get("max_batch_size", 16) or 16)),
            max_seq_len=self.max_seq_len,
            threads=int(params.get("threads", "0")),
            device=params.get("device", "cpu"),
            dtype=params.get("dtype", "float32"),
            **_engine_options(params),
        )
        self.engine.warmup()  # e.g. CUDA graphs of every batch size now, not on a user's request
        self.scheduler = Scheduler(self.engine, max_queue_size=int(params.get("max_waiting", "256")),
                                   prefill_token_budget=int(params.get("prefill_token_budget", "2048")),
                                   prefill_wait=float(params.get("prefill_wait_ms", "0")) / 1e3,
                                   stream_interval=float(params.get("stream_interval_ms", "0")) / 1e3,
                                   stream_rate=_stream_rate(params.get("stream_responses_per_s", "0")),
                                   mix_prefill=_flag(params.get("mix_prefill", "true")),
                                   metrics=GeneratorMetrics(self.model_name))
        pb_utils.Logger.log_info(f"{self.model_name}: {json.dumps(self.engine.describe())}, "
                                 f"end ids {list(self.end_ids)}, malloc keeps freed memory: {keep_freed_memory()}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                seq = self._sequence(request, sender)
                self.scheduler.submit(seq)
            except InvalidParameter as exc:
                sender.send(io.error_response(str(exc)), flags=FINAL)
            except QueueFull as exc:
                sender.send(io.error_response(str(exc), pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
        return None

    def _sequence(self, request, sender) -> Sequence:
        inputs = io.inputs(request)
        prompt = io.check_batch_of_one(inputs, "input_ids").reshape(-1).astype(np.int64)
        if len(prompt) == 0:
            raise InvalidParameter("the prompt has no tokens")
        if len(prompt) + 1 > self.max_seq_len:
            raise InvalidParameter(f"prompt is {len(prompt)} tokens; the model's context is {self.max_seq_len}")
        s = io.scalar
        end_ids = self.end_ids
        end_id = s(inputs, "end_id", int)
        if end_id is not None:
            end_ids = tuple(sorted(set(end_ids) | {end_id}))
        params = SamplingParams(
            max_tokens=s(inputs, "max_tokens", int, required=True),
            temperature=s(inputs, "temperature", float, 0.0),
            top_k=s(inputs, "top_k", int, 0),
            top_p=s(inputs, "top_p", float, 1.0),
            repetition_penalty=s(inputs, "repetition_penalty", float, 1.0),
            presence_penalty=s(inputs, "presence_penalty", float, 0.0),
            frequency_penalty=s(inputs, "frequency_penalty", float, 0.0),
            seed=s(inputs, "seed", int),
            min_tokens=s(inputs, "min_tokens", int, 0),
            end_ids=end_ids,
            bad_words_ids=_split_words(io.optional(inputs, "bad_words_ids")),
        ).validate(self.max_seq_len)
        include_prompt = not s(inputs, "exclude_input_in_output", bool, True)
        tracker = TextTracker(self.tokenizer, prompt if include_prompt else (), io.strings(inputs, "stop_words"))
        cancelled = getattr(sender, "is_cancelled", None) or getattr(request, "is_cancelled", lambda: False)
        return Sequence(prompt, params, tracker, sink=lambda out: _send(sender, out),
                        stream=s(inputs, "stream", bool, False), is_cancelled=cancelled)

    def finalize(self):
        self.scheduler.shutdown()
        summary = self.scheduler.stats.summary()
        captures = getattr(self.engine, "captures", None)  # CUDA graphs (torch engine)
        if captures:
            summary.update({f"graph_captures_{k}": round(v, 3) for k, v in captures.items()})
        stats = " ".join(f"{k}={v}" for k, v in summary.items())
        pb_utils.Logger.log_info(f"{self.model_name}: scheduler {stats}")  # key=value: the log escapes quotes


def _send(sender, out: Output) -> None:
    if out.error:
        sender.send(io.error_response(out.error, pb_utils.TritonError.INTERNAL), flags=FINAL)
        return
    rel = out.release
    window = rel.window if rel else []
    # `tensors` must outlive `send`: the 24.10 stub's ResponseSender.send releases the GIL and then
    # drops the outputs the requester did not ask for (a client calling the generator directly may
    # ask for a subset). If the response held the last reference to such a Tensor, its numpy array is
    # freed without the GIL, which corrupts the interpreter's heap: the stub then dies with SIGSEGV
    # in whichever thread runs next (every time on the GPU, where the first request hung; now and
    # then on CPU). Holding the list here keeps that last reference on this side, freed with the GIL.
    tensors = [
        io.tensor("tokens", window, np.int32),
        io.tensor("read_offset", [rel.read_offset if rel else len(window)], np.int32),
        io.tensor("trim_chars", [rel.trim_chars if rel else 0], np.int32),
        io.tensor("num_input_tokens", [out.num_input_tokens], np.int32),
        io.tensor("num_output_tokens", [out.num_output_tokens], np.int32),
        io.bytes_tensor("finish_reason", out.finish_reason),
    ]
    sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if out.final else 0)
    del tensors  # only now, with the GIL held


AUTO_RATE_PER_CORE = 200.0  # each response: ~2-3 ms of CPU (postprocessing, Triton, client) on 2 cores
AUTO_RATE_MAX = 800.0  # each response is also sent from this process, under the decode loop's GIL


def _stream_rate(value: str) -> float:
    """`stream_responses_per_s`: a number, or "auto": 200 per CPU core of this machine, at most 800.
    Per core: streaming then takes at most about half the CPU. At most 800: every response is also
    built and sent by this one process, under the GIL the decode loop needs; on the H200 at 64
    streams 3,200 responses/s gave 13.3-15.2 k tok/s and 800/s 18.0-18.4 k (400/s: 18.6-18.8 k)."""
    if str(value).strip().lower() == "auto":
        return min(AUTO_RATE_PER_CORE * (os.cpu_count() or 1), AUTO_RATE_MAX)
    return float(value or 0)


def _engine_options(params: dict) -> dict:
    """Optional engine knobs a repository may set as parameters (absent: the engine's defaults)."""
    opts = {k: params[k] for k in ("kernels", "attention") if params.get(k)}
    for flag in ("cuda_graphs", "prefill_graphs"):
        if params.get(flag):
            opts[flag] = _flag(params[flag])
    if params.get("mix_tokens"):
        opts["mix_tokens"] = int(params["mix_tokens"])
    return opts


def _split_words(flat) -> tuple[tuple[int, ...], ...]:
    if flat is None:
        return ()
    words, cur = [], []
    for t in flat.reshape(-1).tolist():
        if t < 0:
            if cur:
                words.append(tuple(cur))
            cur = []
        else:
            cur.append(int(t))
    if cur:
        words.append(tuple(cur))
    return tuple(words)


def _end_ids(version_dir, tokenizer) -> tuple[int, ...]:
    """Every EOS id of the generation config (an int or a list), else the tokenizer's."""
    ids = set()
    gen = version_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    cfg = version_dir / "tokenizer" / "tokenizer_config.json"
    if not ids and cfg.exists():
        eos_tok = json.loads(cfg.read_text()).get("eos_token")
        if isinstance(eos_tok, dict):
            eos_tok = eos_tok.get("content")
        if eos_tok and tokenizer.token_to_id(eos_tok) is not None:
            ids.add(tokenizer.token_to_id(eos_tok))
    return tuple(sorted(int(i) for i in ids))


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")
