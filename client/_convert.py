"""Request building and response/error parsing shared by the sync and the async client.

Owns the mapping between the keyword arguments of `generate`/`tokenize` and the `tandem.v1` protobuf
messages, the mapping of responses to `client.types`, and the turning of a `grpc.RpcError` (sync or
aio: both expose code/details/trailing_metadata synchronously once failed) into a `TandemError`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tandem.v1 import api_pb2

from .types import (
    Completion,
    GenerationResult,
    ModelInfo,
    StreamChunk,
    TandemError,
    Timings,
    TokenizeResult,
    TokenLogprob,
    TopLogprob,
    Usage,
)

# A chat message as callers may give it: {"role": ..., "content": ...} or (role, content).
Message = Mapping[str, str] | Sequence[str]
Metadata = Mapping[str, str] | Sequence[tuple[str, str]] | None

_FINISH_PREFIX = "FINISH_REASON_"


def chat_messages(messages: Iterable[Message]) -> api_pb2.ChatMessages:
    out = api_pb2.ChatMessages()
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            if "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: a dict message needs 'role' and 'content' keys")
            role, content = m["role"], m["content"]
        elif isinstance(m, Sequence) and not isinstance(m, str) and len(m) == 2:
            role, content = m
        else:
            raise ValueError(f"messages[{i}]: expected a {{role, content}} dict or a (role, content) tuple")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"messages[{i}]: role and content must be strings")
        out.messages.add(role=role, content=content)
    return out


def _one_prompt(**forms: Any) -> str:
    given = [name for name, value in forms.items() if value is not None]
    if len(given) != 1:
        names = "/".join(forms)
        raise ValueError(f"give exactly one of {names} (got {', '.join(given) or 'none'})")
    return given[0]


def _set_optional(req: Any, name: str, value: Any) -> None:
    # Only a given value is set: an unset proto3 optional means "server default", and 0 is a real value.
    if value is None:
        return
    try:
        setattr(req, name, value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None


class GenerateParams(TypedDict, total=False):
    """Every GenerateRequest field by name: the keyword arguments of `generate` and `generate_stream`."""

    token_ids: Sequence[int] | None
    messages: Iterable[Message] | None
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    logprobs: int | None
    request_id: str | None
    cache_salt: str | None
    n: int | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: Mapping[int, float] | None
    min_tokens: int | None
    json_schema: str | Mapping[str, Any] | None
    json_object: bool
    regex: str | None
    choice: Sequence[str] | None
    grammar: str | None
    grammar_syntax: str


_SYNTAXES = {"ebnf": api_pb2.Grammar.EBNF, "lark": api_pb2.Grammar.LARK}


def _set_constraint(
    req: api_pb2.GenerateRequest, json_schema: str | Mapping[str, Any] | None, json_object: bool, regex: str | None,
    choice: Sequence[str] | None, grammar: str | None, grammar_syntax: str,
) -> None:
    """Structured output: at most one of json_schema (a JSON Schema as a dict or its JSON text),
    json_object, regex, choice, grammar (EBNF, or Lark with grammar_syntax="lark")."""
    given = [name for name, value in (("json_schema", json_schema), ("json_object", json_object or None),
                                      ("regex", regex), ("choice", choice), ("grammar", grammar))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one constraint (got {', '.join(given)})")
    if grammar_syntax not in _SYNTAXES:
        raise ValueError(f"grammar_syntax: expected one of {sorted(_SYNTAXES)}, not {grammar_syntax!r}")
    if json_schema is not None:
        req.json_schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    elif json_object:
        req.json_object = True
    elif regex is not None:
        req.regex = regex
    elif choice is not None:
        if isinstance(choice, str):
            raise ValueError("choice: a sequence of strings, not one string")
        req.choice.SetInParent()
        req.choice.choices.extend(choice)
    elif grammar is not None:
        req.grammar.text = grammar
        req.grammar.syntax = _SYNTAXES[grammar_syntax]
        req.grammar.SetInParent()


def build_generate_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Iterable[Message] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    request_id: str | None = None,
    cache_salt: str | None = None,
    n: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
    min_tokens: int | None = None,
    json_schema: str | Mapping[str, Any] | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
    grammar_syntax: str = "ebnf",
) -> api_pb2.GenerateRequest:
    form = _one_prompt(prompt=prompt, token_ids=token_ids, messages=messages)
    req = api_pb2.GenerateRequest()
    if form == "prompt":
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string (use token_ids= for token ids)")
        req.text = prompt
    elif form == "token_ids":
        try:
            req.token_ids.ids.extend(token_ids)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise ValueError(f"token_ids: {e}") from None
    else:
        req.chat.CopyFrom(chat_messages(messages))  # type: ignore[arg-type]
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("min_p", min_p),
        ("seed", seed),
        ("logprobs", logprobs),
        ("n", n),
        ("repetition_penalty", repetition_penalty),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
        ("min_tokens", min_tokens),
    ):
        _set_optional(req, name, value)
    if stop is not None:
        # A bare string is one stop string, not a sequence of one-character ones.
        req.stop.extend([stop] if isinstance(stop, str) else list(stop))
    if stop_token_ids is not None:
        try:
            req.stop_token_ids.extend(stop_token_ids)
        except (TypeError, ValueError) as e:
            raise ValueError(f"stop_token_ids: {e}") from None
    req.ignore_eos = bool(ignore_eos)
    if request_id:
        req.request_id = request_id
    if cache_salt:
        req.cache_salt = cache_salt
    if logit_bias:
        try:
            for tok, bias in logit_bias.items():
                req.logit_bias[int(tok)] = float(bias)
        except (TypeError, ValueError) as e:
            raise ValueError(f"logit_bias: {e}") from None
    _set_constraint(req, json_schema, json_object, regex, choice, grammar, grammar_syntax)
    return req


def build_tokenize_request(
    prompt: str | None = None, *, messages: Iterable[Message] | None = None
) -> api_pb2.TokenizeRequest:
    form = _one_prompt(prompt=prompt, messages=messages)
    req = api_pb2.TokenizeRequest()
    if form == "prompt":
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        req.text = prompt
    else:
        req.chat.CopyFrom(chat_messages(messages))  # type: ignore[arg-type]
    return req


def finish_reason_name(value: int) -> str:
    name = api_pb2.FinishReason.Name(value) if value in api_pb2.FinishReason.values() else str(value)
    return name.removeprefix(_FINISH_PREFIX).lower()


def completion_from_proto(c: api_pb2.Completion) -> Completion:
    which = c.WhichOneof("matched")
    return Completion(
        finish_reason=finish_reason_name(c.finish_reason),
        matched_stop=getattr(c, which) if which else None,
        usage=Usage(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens),
        timings=Timings(c.timings.queue_s, c.timings.ttft_s, c.timings.total_s),
    )


def logprobs_from_proto(items: Iterable[api_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(lp.token_id, lp.logprob, [TopLogprob(t.token_id, t.logprob) for t in lp.top])
        for lp in items
    ]


def result_from_response(resp: api_pb2.GenerateResponse) -> GenerationResult:
    c = completion_from_proto(resp.completion) if resp.HasField("completion") else Completion()
    return GenerationResult(
        text=resp.text,
        token_ids=list(resp.token_ids),
        finish_reason=c.finish_reason,
        matched_stop=c.matched_stop,
        usage=c.usage,
        timings=c.timings,
        logprobs=logprobs_from_proto(resp.logprobs),
        request_id=resp.request_id,
        index=resp.index,
        choices=[result_from_response(c) for c in resp.choices],
    )


def chunk_from_response(resp: api_pb2.GenerateResponse) -> StreamChunk:
    return StreamChunk(
        text=resp.text,
        token_ids=list(resp.token_ids),
        logprobs=logprobs_from_proto(resp.logprobs),
        completion=completion_from_proto(resp.completion) if resp.HasField("completion") else None,
        request_id=resp.request_id,
        index=resp.index,
    )


def tokenize_from_response(resp: api_pb2.TokenizeResponse) -> TokenizeResult:
    return TokenizeResult(token_ids=list(resp.token_ids), tokens=list(resp.tokens))


def model_info_from_proto(m: api_pb2.ModelInfo) -> ModelInfo:
    # ModelInfo's fields are named after the message's: a field added to both needs no edit here.
    values = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelInfo)}
    values["eos_token_ids"] = list(m.eos_token_ids)
    return ModelInfo(**values)


def error_from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None) -> TandemError:
    violations: list[tuple[str, str]] = []
    retry_delay: float | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return TandemError(code, message, violations, retry_delay)


def error_from_rpc(err: grpc.RpcError) -> TandemError:
    """Works for sync errors and for grpc.aio.AioRpcError alike (the call has finished either way)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or ""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        # Details that contradict the status line are not trusted; code and message still are.
        status = None
    return error_from_status(code or grpc.StatusCode.UNKNOWN, message, status)


def normalize_metadata(metadata: Metadata) -> list[tuple[str, str]] | None:
    if not metadata:
        return None
    return list(metadata.items()) if isinstance(metadata, Mapping) else list(metadata)


def connection(address: str, metadata: Metadata, api_key: str | None, tls_ca: str | None, tls_cert: str | None,
               tls_key: str | None) -> tuple[list[tuple[str, str]] | None, grpc.ChannelCredentials | None]:
    """(metadata to send with every call, channel credentials or None for plaintext).

    `api_key` becomes `authorization: Bearer <key>`; `tls_ca` (a PEM file; "" = the system's roots)
    turns TLS on, `tls_cert` + `tls_key` add a client certificate (mutual TLS).
    """
    meta = normalize_metadata(metadata) or []
    if api_key:
        meta = [*meta, ("authorization", f"Bearer {api_key}")]
    creds = None
    if tls_ca is not None or tls_cert:
        def read(path: str | None) -> bytes | None:
            return open(path, "rb").read() if path else None

        creds = grpc.ssl_channel_credentials(root_certificates=read(tls_ca), private_key=read(tls_key),
                                             certificate_chain=read(tls_cert))
    return (meta or None), creds
