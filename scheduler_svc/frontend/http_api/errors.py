"""Errors of the HTTP API: OpenAI's error object, and the HTTP status each gRPC status code means.

Owns `{"error": {"message", "type", "param", "code"}}` (what the openai SDKs parse into their
BadRequestError, AuthenticationError, NotFoundError, RateLimitError, InternalServerError), the mapping
from a front-end `Refusal` (whose code is the gRPC status the same request gets on gRPC) to an HTTP
status, and the mapping of a GenerateRequest field name back to the OpenAI parameter that set it, so
that a 400 names the parameter the client sent (`temperature`, `max_tokens`, `messages[0].role`).
"""

from __future__ import annotations

import re

import grpc
from fastapi.responses import JSONResponse

from scheduler_svc.frontend.admission import Refusal

# gRPC status -> (HTTP status, OpenAI error type, code)
_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_argument"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "server_error", "cancelled"),
    grpc.StatusCode.INTERNAL: (500, "server_error", "internal_error"),
}


class ApiError(Exception):
    """An OpenAI error response: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s = retry_after_s
        self.counted = False  # already in the failure metric and the log (a refusal of the front end)

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after_s)))
        if self.status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_argument")


def from_status(code: grpc.StatusCode, message: str) -> ApiError:
    status, type_, err_code = _BY_CODE.get(code, (500, "server_error", "internal_error"))
    retry = 1.0 if status in (429, 503) else None
    return ApiError(status, message, type_, None, err_code, retry)


_CONSTRAINT_FIELDS = frozenset({"json_schema", "json_object", "regex", "choice", "grammar"})


def openai_param(field: str, prompt_param: str, max_tokens_param: str, logprobs_param: str,
                 constraint_param: str = "") -> str:
    """The OpenAI parameter behind a GenerateRequest field named by validation: the prompt's fields
    become `prompt_param` ("prompt" or "messages", with the message index kept), max_new_tokens the
    max-tokens parameter the client used, logprobs `logprobs` or `top_logprobs`, stop[i] `stop`,
    logit_bias[id] `logit_bias`, the constraint's fields `constraint_param` (the response_format or
    structured_outputs parameter it came from, a choice's index kept); the sampling fields have the
    same names in both APIs (temperature, top_p, seed, stop_token_ids, presence_penalty, min_tokens, ...)."""
    base = re.split(r"[.\[]", field, maxsplit=1)[0]
    if base in _CONSTRAINT_FIELDS and constraint_param:
        index = re.fullmatch(r"choice\.choices(\[\d+\])", field)
        return constraint_param + (index.group(1) if index else "")
    if base in ("text", "token_ids", "chat", "prompt"):
        if field.startswith("chat.messages"):
            return "messages" + field[len("chat.messages"):]
        return prompt_param
    if base == "max_new_tokens":
        return max_tokens_param
    if base == "logprobs":
        return logprobs_param
    if base in ("stop", "logit_bias"):
        return base
    return field


def from_refusal(refusal: Refusal, prompt_param: str = "prompt", max_tokens_param: str = "max_tokens",
                 logprobs_param: str = "logprobs", constraint_param: str = "") -> ApiError:
    if refusal.field is None:
        err = from_status(refusal.code, refusal.message)
        if refusal.retry_after_s is not None:
            err.retry_after_s = refusal.retry_after_s
        return err
    param = openai_param(refusal.field, prompt_param, max_tokens_param, logprobs_param, constraint_param)
    return bad_request(param, f"{param}: {refusal.description}")
