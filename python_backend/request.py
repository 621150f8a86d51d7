"""The generator's requests and responses: a Triton request -> a `Sequence` for the scheduler, an
`Output` -> a Triton response (the tensors postprocessing reads). The scheduler (batching/) knows
nothing of Triton; this module is the border.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from . import limits as lim
from . import triton_io as io
from .batching.detokenize import TextTracker, delta
from .batching.sampling import InvalidParameter, SamplingParams
from .batching.sequence import Output, Sequence
from .limits import Limits

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
#: generation requests of the entry model carry ids with this prefix: the entry watches its client
#: for cancellation and tells the generator with a control request naming the id (flow.py)
ENTRY_ID_PREFIX = "tc-"


def request_flag(request, name: str) -> bool:
    """True where the request carries the BOOL input `name` set to true."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    return t is not None and bool(t.as_numpy().reshape(-1)[:1].any())


def to_sequence(request, sender, *, tokenizer, end_ids: tuple[int, ...], limits: Limits,
                poll_cancel: bool = True, on_final=None) -> Sequence:
    """A Triton request to the generator -> a `Sequence` (`sequence_of`). `poll_cancel`: the courier
    asks `sender` about cancellation (False where the caller, the entry model, watches the client for
    it)."""
    if poll_cancel:
        cancelled = getattr(sender, "is_cancelled", None) or getattr(request, "is_cancelled", lambda: False)
    else:
        cancelled = _never
    return sequence_of(io.inputs(request), sender, request_id=request.request_id() or "",
                       outputs=_requested_outputs(request), tokenizer=tokenizer, end_ids=end_ids, limits=limits,
                       is_cancelled=cancelled, on_final=on_final)


def sequence_of(inputs: dict, sender, *, request_id: str, outputs: set, tokenizer, end_ids: tuple[int, ...],
                limits: Limits, is_cancelled=None, on_final=None) -> Sequence:
    """Parse and validate one generation request's inputs (name -> Tensor: the generator's, as
    preprocessing or the entry's prompt.py makes them) as if they came from any client
    (InvalidParameter: a message for the client). Its responses go to `sender` and hold the
    `outputs` among OUTPUT_NAMES (the requester's requested outputs). `is_cancelled`: polled by the
    courier; `on_final(output)`: called once the final output's send returned or failed."""
    max_seq_len, vocab = limits.max_seq_len, limits.vocab_size
    prompt = io.check_batch_of_one(inputs, "input_ids")
    prompt = lim.token_ids(prompt, "input_ids", vocab)
    if len(prompt) == 0:
        raise InvalidParameter("the prompt has no tokens")
    if len(prompt) + 1 > max_seq_len:
        raise InvalidParameter(f"prompt is {len(prompt)} tokens; the model's context is {max_seq_len}")
    end_id = lim.integer(inputs, "end_id", 0, vocab - 1)
    lim.integer(inputs, "pad_id", 0, vocab - 1)  # accepted for the contract; checked all the same
    if end_id is not None:
        end_ids = tuple(sorted(set(end_ids) | {end_id}))
    bad_words = io.optional(inputs, "bad_words_ids")
    if bad_words is not None:
        bad_words = lim.token_ids(bad_words, "bad_words_ids", vocab, allow_separator=True)
    s = io.scalar
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
        bad_words_ids=split_words(bad_words),
    ).validate(max_seq_len)
    include_prompt = not s(inputs, "exclude_input_in_output", bool, True)
    # a raw prompt's output continues its text (prompt + output = the text of both, as vLLM and TGI
    # give it); a chat's answer is a message of its own, decoded alone as transformers' chat examples do
    continues = not include_prompt and not s(inputs, "apply_chat_template", bool, False)
    tracker = TextTracker(tokenizer, prompt if include_prompt else (), lim.words(inputs, "stop_words", limits),
                          context_ids=prompt if continues else ())
    wanted = frozenset(outputs) & OUTPUT_NAMES

    def sink(out: Output) -> None:
        try:
            send(sender, out, tokenizer, wanted)
        finally:  # also when the send failed (a client gone): whoever waits for the end must hear of it
            if out.final and on_final is not None:
                on_final(out)

    return Sequence(prompt, params, tracker, sink=sink, stream=s(inputs, "stream", bool, False),
                    is_cancelled=is_cancelled or _never, request_id=request_id)


def _never() -> bool:
    return False


#: what a generator response can hold: the pieces postprocessing detokenizes, the counts, and the
#: text and new ids themselves (as postprocessing makes them)
RAW_OUTPUTS = frozenset({"tokens", "read_offset", "trim_chars"})
TEXT_OUTPUTS = frozenset({"text_output", "output_ids"})
OUTPUT_NAMES = RAW_OUTPUTS | TEXT_OUTPUTS | {"num_input_tokens", "num_output_tokens", "finish_reason"}


def _requested_outputs(request) -> set:
    try:
        return set(request.requested_output_names())
    except Exception:  # noqa: BLE001 - a stub without the call: the outputs without text, as before
        return set(OUTPUT_NAMES - TEXT_OUTPUTS)


def send(sender, out: Output, tokenizer, wanted: frozenset = OUTPUT_NAMES) -> None:
    """Send one output as a response (the final one with the FINAL flag; an error as INTERNAL),
    holding the `wanted` outputs only (each tensor is shared memory and a copy on the server's side:
    nothing the requester drops is made)."""
    if out.error:
        sender.send(io.error_response(out.error, pb_utils.TritonError.INTERNAL), flags=FINAL)
        return
    rel = out.release
    window = rel.window if rel else []
    offset = rel.read_offset if rel else len(window)
    trim = rel.trim_chars if rel else 0
    # `tensors` must outlive `send`: the 24.10 stub's ResponseSender.send releases the GIL and then
    # drops the outputs the requester did not ask for (a client calling the generator directly may
    # ask for a subset). If the response held the last reference to such a Tensor, its numpy array is
    # freed without the GIL, which corrupts the interpreter's heap: the stub then dies with SIGSEGV
    # in whichever thread runs next (every time on the GPU, where the first request hung; now and
    # then on CPU). Holding the list here keeps that last reference on this side, freed with the GIL.
    tensors = []
    if "tokens" in wanted:
        tensors.append(io.tensor("tokens", window, np.int32))
    if "read_offset" in wanted:
        tensors.append(io.tensor("read_offset", [offset], np.int32))
    if "trim_chars" in wanted:
        tensors.append(io.tensor("trim_chars", [trim], np.int32))
    if "text_output" in wanted:
        tensors.append(io.bytes_tensor("text_output", delta(tokenizer, window, offset, trim)))
    if "output_ids" in wanted:
        tensors.append(io.tensor("output_ids", window[offset:], np.int32))
    if "num_input_tokens" in wanted:
        tensors.append(io.tensor("num_input_tokens", [out.num_input_tokens], np.int32))
    if "num_output_tokens" in wanted:
        tensors.append(io.tensor("num_output_tokens", [out.num_output_tokens], np.int32))
    if "finish_reason" in wanted:
        tensors.append(io.bytes_tensor("finish_reason", out.finish_reason))
    sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if out.final else 0)
    del tensors  # only now, with the GIL held


def reject(sender, message: str, code=None) -> None:
    """Answer a request the scheduler did not take with one final error response (default INVALID_ARG)."""
    sender.send(io.error_response(message, code), flags=FINAL)


def split_words(flat) -> tuple[tuple[int, ...], ...]:
    """`bad_words_ids` as preprocessing sends them (the words' ids, each word ended by -1) -> words."""
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


def model_end_ids(version_dir, tokenizer) -> tuple[int, ...]:
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
