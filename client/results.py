"""What the client returns: :class:`Completion` (whole answer) and :class:`Delta` (one streamed
piece), and the code that reads them out of a gRPC ``InferResult`` or a ``generate`` JSON object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

__all__ = ["Completion", "Delta", "delta_from_infer_result", "delta_from_json", "has_outputs", "is_final_response",
           "merge_deltas"]


@dataclass
class Delta:
    """One response of a streamed generation: the new text and the ids it came from."""

    text: str = ""
    output_ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # None while streaming; "stop" | "length" | "cancelled" at the end
    num_output_tokens: Optional[int] = None  # tokens generated so far
    num_input_tokens: Optional[int] = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    """A finished generation."""

    text: str
    output_ids: List[int]
    num_input_tokens: Optional[int]
    num_output_tokens: Optional[int]
    finish_reason: Optional[str]


def _flat(value: Any) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        out: List[Any] = []
        for v in value:
            out.extend(_flat(v))
        return out
    return [value]


def _text(value: Any) -> str:
    parts = _flat(value)
    raw = b"".join(p if isinstance(p, (bytes, bytearray)) else str(p).encode("utf-8") for p in parts)
    return raw.decode("utf-8", errors="replace")


def _int(value: Any) -> Optional[int]:
    parts = _flat(value)
    return int(parts[0]) if parts else None


def _reason(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = _text(value).strip()
    return text or None


def delta_from_json(obj: Dict[str, Any]) -> Delta:
    """From one ``generate``/``generate_stream`` JSON response (one-element tensors come as scalars)."""
    return Delta(
        text=_text(obj.get("text_output")),
        output_ids=[int(x) for x in _flat(obj.get("output_ids"))],
        finish_reason=_reason(obj.get("finish_reason")),
        num_output_tokens=_int(obj.get("num_output_tokens")),
        num_input_tokens=_int(obj.get("num_input_tokens")),
    )


def delta_from_infer_result(result: Any) -> Delta:
    """From a ``tritonclient.grpc.InferResult`` (missing outputs read as empty)."""
    def get(name: str):
        try:
            return result.as_numpy(name)
        except Exception:
            return None

    return Delta(
        text=_text(get("text_output")),
        output_ids=[int(x) for x in _flat(get("output_ids"))],
        finish_reason=_reason(get("finish_reason")),
        num_output_tokens=_int(get("num_output_tokens")),
        num_input_tokens=_int(get("num_input_tokens")),
    )


def has_outputs(result: Any) -> bool:
    try:
        return len(result.get_response().outputs) > 0
    except Exception:
        return True


def is_final_response(result: Any) -> Optional[bool]:
    """The ``triton_final_response`` parameter of a streamed gRPC response (None if absent)."""
    try:
        params = result.get_response().parameters
    except Exception:
        return None
    if "triton_final_response" not in params:
        return None
    return bool(params["triton_final_response"].bool_param)


def merge_deltas(deltas: Iterable[Delta]) -> Completion:
    """A :class:`Completion` from the responses of one request (texts and ids concatenated,
    the last counts and finish reason kept)."""
    text, ids = [], []
    n_in = n_out = reason = None
    for d in deltas:
        text.append(d.text)
        ids.extend(d.output_ids)
        if d.num_input_tokens is not None:
            n_in = d.num_input_tokens
        if d.num_output_tokens is not None:
            n_out = d.num_output_tokens
        if d.finish_reason is not None:
            reason = d.finish_reason
    return Completion("".join(text), ids, n_in, n_out, reason)
