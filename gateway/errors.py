"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the right status.

Every refusal the gateway answers goes through :class:`APIError`; what Triton reports arrives as a
:class:`tritonchat.client.TritonChatError` (Triton 2.51 drops the Python backend's error codes, so the
client maps by code where there is one and by message where there is not: "Exceeds maximum queue
size", "generator queue is full" -> :class:`ServerUnavailable`) and is mapped here by
:func:`from_triton`. Bad input is never a 500.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from tritonchat.client.errors import (InvalidRequest, ModelNotFound, RequestCancelled, RequestTimeout,
                                      ServerUnavailable, TritonChatError)

__all__ = ["APIError", "bad_request", "from_triton", "from_validation"]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_triton(exc: TritonChatError) -> APIError:
    """The status a Triton failure becomes: bad values 400, overload / not ready 503, timeout 504."""
    msg = exc.message
    if "is restricted" in msg or exc.status in ("StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED"):
        # Triton locked with keys (tritonchat/security.py) and the gateway lacks the right one: its
        # operator's problem, not the client's
        return APIError(502, f"the inference server refused the gateway's credentials (configure its "
                             f"triton_api_key_file / triton_admin_key_file): {msg}", "server_error",
                        code="upstream_auth")
    if isinstance(exc, InvalidRequest):
        return APIError(400, msg, "invalid_request_error")
    if isinstance(exc, ServerUnavailable):
        # Triton's queue ("Exceeds maximum queue size"), the generator's waiting line ("generator
        # queue is full"), or Triton not reachable: the client should come back a little later
        return APIError(503, msg, "server_error", code="overloaded" if "queue" in msg.lower() else "unavailable",
                        headers={"Retry-After": "1"})
    if isinstance(exc, ModelNotFound):
        # the gateway knows the names it serves; Triton not having the entry model means "not ready"
        return APIError(503, f"the model is not ready on the inference server: {msg}", "server_error",
                        code="model_not_ready", headers={"Retry-After": "5"})
    if isinstance(exc, RequestTimeout):
        return APIError(504, msg, "server_error", code="timeout")
    if isinstance(exc, RequestCancelled):
        return APIError(503, msg, "server_error", code="cancelled")
    return APIError(500, msg, "server_error")


def from_validation(errors) -> APIError:
    """A pydantic ``ValidationError.errors()`` list -> one 400 naming the first field and what is wrong."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    if kind == "json_invalid":
        return bad_request(f"We could not parse the JSON body of your request: {first.get('msg')}", None,
                           "invalid_json")
    if kind == "model_type" and not loc:
        return bad_request("The request body must be a JSON object.")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return bad_request(f"Invalid value for '{param}': {msg}" if param else msg, param)
