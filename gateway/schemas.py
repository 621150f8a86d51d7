"""The OpenAI request bodies (pydantic, strict) and what they become for the entry model.

Validation is strict on purpose: ``"max_tokens": "5"`` is a 400 here, where Triton's own JSON parser
would answer 500. Fields the OpenAI API defines that this server cannot honour (``logprobs``,
``tools``, ``n`` > 1 ...) are a clear 400 naming the field, not silence; fields it does not define
are refused as OpenAI does ("Unrecognized request argument"). Extensions (as vLLM names them):
``top_k``, ``min_tokens``, ``repetition_penalty``, ``ignore_eos``, and
``stream_options.continuous_usage_stats`` (usage in every chunk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tritonchat.client.params import GenerationParams

from .errors import bad_request

__all__ = ["ChatRequest", "CompletionRequest", "Prepared", "prepare"]

_UINT64 = 2 ** 64


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None  # extension (vLLM): usage in every chunk


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    # "developer" is OpenAI's newer name for "system"; tool/function messages need tools (unsupported)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[TextPart]]
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"content part type {part.get('type')!r} is not supported (text only)")
        elif not isinstance(v, str):
            raise ValueError("content must be a string or a list of text parts")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


# OpenAI fields this server does not support: a value other than these "off" values is a 400
_OFF: Dict[str, tuple] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
    "response_format": (None, {"type": "text"}), "best_of": (None, 1), "suffix": (None, ""),
    "store": (None, False),
}


class _Common(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, List[str], None] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = None
    user: Optional[str] = None
    metadata: Optional[Dict[str, str]] = None
    service_tier: Optional[str] = None
    # extensions
    top_k: Optional[int] = Field(None, ge=0)
    min_tokens: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: Optional[bool] = None
    # defined by OpenAI, refused unless "off" (see _OFF)
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and not 0 <= v < _UINT64:
            raise ValueError("seed must be in [0, 2**64)")
        return v

    @model_validator(mode="after")
    def _supported(self):
        # an APIError (not a ValueError) leaves pydantic as it is: a 400 naming the field
        if self.n not in (None, 1):
            raise bad_request("n: only n = 1 is supported (one choice per request)", "n")
        for name, off in _OFF.items():
            if name in type(self).model_fields and getattr(self, name) not in off:
                raise bad_request(f"{name}: not supported by this server", name, "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options: only allowed when stream is true", "stream_options")
        return self

    def stop_list(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Common):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None


class CompletionRequest(_Common):
    prompt: Union[str, List[str]]
    echo: Optional[bool] = False
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if v and all(isinstance(x, int) for x in v) or v and all(isinstance(x, list) for x in v):
                raise ValueError("token-id prompts are not supported; send text")
            if len(v) != 1:
                raise ValueError("exactly one prompt per request (a list of one string, or a string)")
            if not isinstance(v[0], str):
                raise ValueError("prompt must be a string")
        elif not isinstance(v, str):
            raise ValueError("prompt must be a string")
        return v


@dataclass
class Prepared:
    """What a request becomes: the entry model's prompt and parameters, and how to answer."""

    kind: str  # "chat" | "completion"
    model: str  # the name the client used (echoed back)
    prompt: Any  # chat: canonical messages [{role, content}]; completion: the prompt string
    params: GenerationParams
    stream: bool
    include_usage: bool
    continuous_usage: bool
    deterministic: bool

    def canonical_input(self) -> str:
        return json.dumps(self.prompt, ensure_ascii=False, separators=(",", ":"))


def prepare(req: Union[ChatRequest, CompletionRequest], *, default_max_tokens: int, max_stop: int,
            max_stop_chars: int) -> Prepared:
    """Checks that need more than one field, then the entry model's prompt and GenerationParams."""
    stops = req.stop_list()
    if len(stops) > max_stop:
        raise bad_request(f"stop: at most {max_stop} sequences, got {len(stops)}", "stop")
    for s in stops:
        if not s:
            raise bad_request("stop: a stop sequence must not be empty", "stop")
        if len(s) > max_stop_chars:
            raise bad_request(f"stop: a stop sequence is at most {max_stop_chars} characters", "stop")
    if isinstance(req, ChatRequest):
        if (req.max_tokens is not None and req.max_completion_tokens is not None
                and req.max_tokens != req.max_completion_tokens):
            raise bad_request("max_tokens and max_completion_tokens differ: send one of them", "max_tokens")
        max_tokens = req.max_completion_tokens or req.max_tokens
        # developer is the newer name of system; names are not part of what templates render
        prompt: Any = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                       for m in req.messages]
        if not any(m["content"].strip() for m in prompt):
            raise bad_request("messages: every message is empty", "messages")
        kind = "chat"
    else:
        max_tokens = req.max_tokens
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        if not prompt.strip():
            raise bad_request("prompt is empty", "prompt")
        kind = "completion"
    max_tokens = max_tokens or default_max_tokens
    min_tokens = req.min_tokens
    if req.ignore_eos:
        min_tokens = max_tokens
    if min_tokens is not None and min_tokens > max_tokens:
        raise bad_request(f"min_tokens {min_tokens} is larger than max_tokens {max_tokens}", "min_tokens")
    _check_encodable(prompt, stops)
    params = GenerationParams(
        max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, min_tokens=min_tokens, stop=stops or None,
        apply_chat_template=True if kind == "chat" else None,
        exclude_input_in_output=False if (kind == "completion" and req.echo) else None)
    opts = req.stream_options
    # greedy (temperature 0, the server's default) or a fixed seed: the same request, the same answer
    deterministic = not req.temperature or req.seed is not None
    return Prepared(kind, req.model, prompt, params, bool(req.stream),
                    bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats), deterministic)


def _check_encodable(prompt: Any, stops: List[str]) -> None:
    # JSON may carry lone surrogates (\ud800), which are not text and cannot become UTF-8 bytes
    for what, value in (("prompt" if isinstance(prompt, str) else "messages", prompt), ("stop", stops)):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"{what}: contains an unpaired surrogate (not valid Unicode text)", what) from None
