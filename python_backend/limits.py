"""Bounds before work: every public input checked for type, shape and range before anything costly
(tokenization, a KV slot) is spent on it, with a message that names the field.

The entry model checks the whole public contract (docs/contract.md) here; the internal models
(preprocessing, generator, postprocessing) check what they receive with the same functions, as if
they were public: a client may call them directly.

Decisions (docs/contract.md, "Bounds"):
- a prompt is capped in UTF-8 bytes before it is tokenized (`max_prompt_bytes`, default 16 bytes per
  token of context: more than any tokenizer's longest token, so a prompt that could fit the context
  is never refused here; the exact token count is checked after tokenization);
- NUL (U+0000) is refused in every text input: no chat text contains it, several tokenizers map it
  to nothing or to a byte token that models never saw, and log lines and C strings end at it;
- stop and bad words are bounded in count and in bytes (each is matched against the text after
  every token: 1,000 of them, or one of 100 KB, costs every step of the request);
- integers are range-checked on the values Triton hands over; what Triton's own HTTP JSON parser
  does before any model runs (a JSON number beyond INT32 wraps, a wrong JSON type is a 500) is
  listed in docs/contract.md.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from .batching.sampling import InvalidParameter, SamplingParams

INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Limits:
    max_seq_len: int
    vocab_size: int
    max_prompt_bytes: int = 0  # 0: 16 bytes per token of context
    max_words: int = 16  # stop words, and bad words, per request
    max_word_bytes: int = 256

    @property
    def prompt_bytes(self) -> int:
        return self.max_prompt_bytes or 16 * self.max_seq_len

    @classmethod
    def from_params(cls, params: dict) -> "Limits":
        def num(key, default):
            v = params.get(key, "")
            return int(v) if str(v).strip() not in ("", "null", "None") else default

        return cls(max_seq_len=int(params["max_seq_len"]), vocab_size=num("vocab_size", 0) or INT32_MAX,
                   max_prompt_bytes=num("max_prompt_bytes", 0), max_words=num("max_words", 16),
                   max_word_bytes=num("max_word_bytes", 256))


def one(inputs: dict, name: str):
    """The single value of input `name` (None when absent); a request carries one prompt, so every
    scalar input holds exactly one value."""
    t = inputs.get(name)
    if t is None:
        return None
    arr = t.as_numpy() if hasattr(t, "as_numpy") else np.asarray(t)
    if arr.size != 1:
        raise InvalidParameter(f"input '{name}' must hold exactly one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def text(value, name: str, max_bytes: int, *, allow_empty: bool = False) -> str:
    """A text input: bytes -> str, checked for size (before decoding), UTF-8 and NUL."""
    raw = value if isinstance(value, (bytes, np.bytes_)) else str(value).encode("utf-8")
    if len(raw) > max_bytes:
        raise InvalidParameter(f"input '{name}' is {len(raw)} bytes; the limit is {max_bytes} bytes")
    try:
        s = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameter(f"input '{name}' is not valid UTF-8 (byte {exc.start})") from None
    if "\x00" in s:
        raise InvalidParameter(f"input '{name}' contains a NUL character (U+0000), which is not accepted")
    if not allow_empty and not s.strip():
        raise InvalidParameter(f"{name} is empty")
    return s


def integer(inputs: dict, name: str, lo: int, hi: int, default=None, required: bool = False):
    v = one(inputs, name)
    if v is None:
        if required:
            raise InvalidParameter(f"input '{name}' is required")
        return default
    if isinstance(v, (bytes, np.bytes_, str, float, np.floating)) or isinstance(v, (bool, np.bool_)):
        raise InvalidParameter(f"input '{name}' must be an integer, got {type(v).__name__}")
    v = int(v)
    if not lo <= v <= hi:
        raise InvalidParameter(f"input '{name}' must be in [{lo}, {hi}], got {v}")
    return v


def flag(inputs: dict, name: str, default: bool = False) -> bool:
    v = one(inputs, name)
    if v is None:
        return default
    if not isinstance(v, (bool, np.bool_)):
        raise InvalidParameter(f"input '{name}' must be true or false")
    return bool(v)


def words(inputs: dict, name: str, limits: Limits) -> list[str]:
    """A list-of-strings input (stop_words, bad_words): bounded in count and bytes, empty strings dropped."""
    t = inputs.get(name)
    if t is None:
        return []
    arr = t.as_numpy() if hasattr(t, "as_numpy") else np.asarray(t)
    flat = arr.reshape(-1)
    if flat.size > limits.max_words:
        raise InvalidParameter(f"input '{name}' has {flat.size} entries; the limit is {limits.max_words}")
    out = []
    for v in flat:
        s = text(v, name, limits.max_word_bytes, allow_empty=True)
        if s:
            out.append(s)
    return out


def token_ids(values, name: str, vocab_size: int, *, allow_separator: bool = False) -> np.ndarray:
    """Token ids must name tokens of the vocabulary (-1 is the word separator of bad_words_ids)."""
    ids = np.asarray(values).reshape(-1).astype(np.int64)
    lo = -1 if allow_separator else 0
    bad = (ids < lo) | (ids >= vocab_size)
    if bad.any():
        raise InvalidParameter(f"input '{name}' holds token id {int(ids[bad][0])}, outside the vocabulary "
                               f"[0, {vocab_size})")
    return ids


def unknown_parameters(request, known: set[str]) -> None:
    """Refuse request parameters that are not inputs of the model. Over HTTP `generate`, Triton
    turns every JSON key that is not an input into a request parameter, so a misspelled input
    (`max_token`) would otherwise be silently ignored."""
    try:
        raw = request.parameters()
    except Exception:  # noqa: BLE001 - an old stub without parameters(): nothing to check
        return
    params = json.loads(raw) if isinstance(raw, str) and raw else (raw or {})
    extra = sorted(k for k in params if k not in known)
    if extra:
        raise InvalidParameter(f"unknown input '{extra[0]}' (known inputs: {', '.join(sorted(known))})")


def number(inputs: dict, name: str, default=None):
    """A float input's one value (its range is the sampling parameters' check)."""
    v = one(inputs, name)
    if v is None:
        return default
    if isinstance(v, (bytes, np.bytes_, str)):
        raise InvalidParameter(f"input '{name}' must be a number")
    return float(v)


def check_public(inputs: dict, limits: Limits) -> dict:
    """Check every input of the public contract (docs/contract.md) before any work; return the
    values the entry needs (prompt bytes, max_tokens, stream). Raises InvalidParameter. The
    sampling parameters' ranges are `SamplingParams.validate`'s, the generator's own check."""
    raw = one(inputs, "text_input")
    if raw is None:
        raise InvalidParameter("input 'text_input' is required")
    prompt = text(raw, "text_input", limits.prompt_bytes)
    wide = (-2**63, 2**63 - 1)  # the range itself is validate's: here only the type and the shape
    params = SamplingParams(
        max_tokens=integer(inputs, "max_tokens", *wide, required=True),
        temperature=number(inputs, "temperature", 0.0),
        top_k=integer(inputs, "top_k", *wide, 0),
        top_p=number(inputs, "top_p", 1.0),
        repetition_penalty=number(inputs, "repetition_penalty", 1.0),
        presence_penalty=number(inputs, "presence_penalty", 0.0),
        frequency_penalty=number(inputs, "frequency_penalty", 0.0),
        seed=integer(inputs, "seed", 0, 2**64 - 1),
        min_tokens=integer(inputs, "min_tokens", *wide, 0),
    ).validate(limits.max_seq_len)
    for name in ("end_id", "pad_id"):
        integer(inputs, name, 0, limits.vocab_size - 1)
    stream = flag(inputs, "stream")
    for name in ("exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens",
                 "apply_chat_template"):
        flag(inputs, name)
    words(inputs, "stop_words", limits)
    words(inputs, "bad_words", limits)
    return {"prompt_bytes": len(prompt.encode("utf-8")), "max_tokens": params.max_tokens, "stream": stream}
