"""The OpenAI response objects: whole answers and streamed chunks (Server-Sent Events), for
``/v1/chat/completions`` (``chat.completion[.chunk]``) and ``/v1/completions`` (``text_completion``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, Optional

__all__ = ["Shaper", "usage", "DONE"]

DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: Optional[int], completion_tokens: Optional[int]) -> Dict[str, int]:
    p, c = int(prompt_tokens or 0), int(completion_tokens or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: Dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class Shaper:
    """Formats one request's answer; ``kind`` is "chat" or "completion"."""

    def __init__(self, kind: str, model: str, fingerprint: Optional[str] = None,
                 include_usage: bool = False, continuous_usage: bool = False):
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint
        self.include_usage = include_usage or continuous_usage
        self.continuous_usage = continuous_usage
        self._first = True

    def _head(self, obj: str) -> Dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.chat:
            head["system_fingerprint"] = self.fingerprint
        return head

    def chunk(self, text: str, finish_reason: Optional[str] = None,
              prompt_tokens: Optional[int] = None, completion_tokens: Optional[int] = None) -> bytes:
        if self.chat:
            delta: Dict[str, Any] = {}
            if self._first:
                delta["role"] = "assistant"
            if text or self._first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = self._head("text_completion")
        self._first = False
        obj["choices"] = [choice]
        if self.include_usage:  # OpenAI: null on every chunk but the last; continuous: counts so far
            obj["usage"] = usage(prompt_tokens, completion_tokens) if self.continuous_usage else None
        return _sse(obj)

    def usage_chunk(self, prompt_tokens: Optional[int], completion_tokens: Optional[int]) -> bytes:
        obj = self._head("chat.completion.chunk" if self.chat else "text_completion")
        obj["choices"] = []
        obj["usage"] = usage(prompt_tokens, completion_tokens)
        return _sse(obj)

    def whole(self, text: str, finish_reason: Optional[str], prompt_tokens: Optional[int],
              completion_tokens: Optional[int]) -> Dict[str, Any]:
        if self.chat:
            obj = self._head("chat.completion")
            obj["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                               "logprobs": None, "finish_reason": finish_reason}]
        else:
            obj = self._head("text_completion")
            obj["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        obj["usage"] = usage(prompt_tokens, completion_tokens)
        return obj

    @staticmethod
    def error_event(body: Dict[str, Any]) -> bytes:
        """An error after the stream has begun (headers sent): OpenAI's SDKs raise on a data event
        with an ``error`` key."""
        return _sse(body)
