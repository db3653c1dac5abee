"""OpenAI request bodies -> tandem.v1 GenerateRequest / TokenizeRequest.

Owns the mapping of every OpenAI (and vLLM extra) parameter onto the gRPC request, so that the HTTP
API validates through the same `validation.build_request` as gRPC; what `Spec` records is how the
client asked (the parameter names to report errors under, the output options). Parameters Tandem
does not serve are refused here by name; values that do not even fit the proto field's type (a
negative max_tokens, a seed past 64 bits) too.

The sampling controls map onto the GenerateRequest fields of the same names (n, the penalties,
min_tokens; logit_bias's keys, token-id strings, become ints).

Structured output, on both endpoints, onto the GenerateRequest's `constraint` oneof: OpenAI's
`response_format` ({"type": "text"} = none, {"type": "json_object"}, {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}) and vLLM's `structured_outputs` ({"json": schema or its
JSON text, "json_object": true, "regex", "choice": [...], "grammar"}). One constraint per request;
`Spec.constraint_param` is the parameter it came from, which errors about it name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.v1 import api_pb2

from scheduler_svc.frontend.http_api.errors import bad_request
from scheduler_svc.frontend.http_api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingBody,
    StructuredOutputs,
)

UINT32 = 1 << 32
UINT64 = 1 << 64


@dataclass(frozen=True)
class Spec:
    """How the client asked: the names its parameters go by and what the response must carry."""

    chat: bool
    prompt_param: str  # "prompt" or "messages"
    max_tokens_param: str  # "max_tokens" or "max_completion_tokens"
    logprobs_param: str  # "logprobs" or "top_logprobs"
    logprobs: int | None  # None: not asked; else this many alternatives per token
    stream: bool
    include_usage: bool
    return_token_ids: bool
    constraint_param: str = ""  # "" = no constraint; else e.g. response_format.json_schema.schema


def _put(setter: Callable[[], Any], param: str, value: object) -> None:
    """A proto assignment that fails on a value outside the field's type becomes a 400 naming `param`."""
    try:
        setter()
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad_request(param, f"{param}: {value!r} is out of range") from exc


def _penalties(body: SamplingBody, msg: api_pb2.GenerateRequest) -> None:
    """n, the penalties, logit_bias and min_tokens onto the proto fields of the same names."""
    if body.n is not None:
        _put(lambda: setattr(msg, "n", body.n), "n", body.n)
    for param in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(body, param)
        if value is not None:
            _put(lambda p=param, v=value: setattr(msg, p, v), param, value)
    if body.min_tokens is not None:
        _put(lambda: setattr(msg, "min_tokens", body.min_tokens), "min_tokens", body.min_tokens)
    for key, bias in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request("logit_bias", f"logit_bias: keys are token ids, not {key!r}") from None
        _put(lambda t=token, b=bias: msg.logit_bias.__setitem__(t, b), "logit_bias", key)


def _sampling(body: SamplingBody, msg: api_pb2.GenerateRequest, max_tokens: int | None, max_param: str) -> None:
    _penalties(body, msg)
    if max_tokens is not None:
        if max_tokens < 1:
            raise bad_request(max_param, f"{max_param}: must be at least 1")
        _put(lambda: setattr(msg, "max_new_tokens", max_tokens), max_param, max_tokens)
    for param in ("temperature", "top_p", "min_p"):
        value = getattr(body, param)
        if value is not None:
            _put(lambda p=param, v=value: setattr(msg, p, v), param, value)
    if body.top_k is not None:
        top_k = 0 if body.top_k == -1 else body.top_k  # vLLM's -1 = off
        _put(lambda: setattr(msg, "top_k", top_k), "top_k", body.top_k)
    if body.seed is not None:
        if not 0 <= body.seed < UINT64:
            raise bad_request("seed", f"seed: must be in [0, 2^64), not {body.seed}")
        msg.seed = body.seed
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        msg.stop.extend(stops)
    if body.stop_token_ids:
        _put(lambda: msg.stop_token_ids.extend(body.stop_token_ids), "stop_token_ids", body.stop_token_ids)
    msg.ignore_eos = body.ignore_eos
    if body.cache_salt is not None:
        msg.cache_salt = body.cache_salt


# A Lark rule or terminal definition at the start of a line: `start: ...`, `?expr: ...`, `NUMBER.2: ...`.
_LARK_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][A-Za-z0-9_]*(\.-?\d+)?[ \t]*:", re.MULTILINE)


def grammar_syntax(text: str) -> int:
    """Grammar.Syntax of a structured_outputs.grammar text: EBNF (GBNF) defines its rules with `::=`;
    a text with no `::=` and at least one rule written `name: ...` (Lark's form) is Lark. Anything
    else is taken for EBNF, whose compiler then says what is wrong with it."""
    if "::=" not in text and _LARK_RULE.search(text):
        return api_pb2.Grammar.LARK
    return api_pb2.Grammar.EBNF


def _schema_text(schema: object) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _structured_outputs(so: StructuredOutputs) -> list[tuple[str, Callable[[api_pb2.GenerateRequest], None]]]:
    for key, value in (so.model_extra or {}).items():
        if value not in (None, False):  # vLLM's other options (structural_tag, whitespace_pattern, ...)
            raise bad_request(f"structured_outputs.{key}", f"structured_outputs.{key}: not supported")
    given: list[tuple[str, Callable[[api_pb2.GenerateRequest], None]]] = []
    if so.json_ is not None:
        text = _schema_text(so.json_)
        given.append(("structured_outputs.json", lambda m: setattr(m, "json_schema", text)))
    if so.json_object:
        given.append(("structured_outputs.json_object", lambda m: setattr(m, "json_object", True)))
    if so.regex is not None:
        regex = so.regex
        given.append(("structured_outputs.regex", lambda m: setattr(m, "regex", regex)))
    if so.choice is not None:
        choices = so.choice

        def put_choice(m: api_pb2.GenerateRequest) -> None:
            m.choice.SetInParent()  # an empty list is still the choice constraint (and refused as empty)
            m.choice.choices.extend(choices)
        given.append(("structured_outputs.choice", put_choice))
    if so.grammar is not None:
        grammar = api_pb2.Grammar(text=so.grammar, syntax=grammar_syntax(so.grammar))
        given.append(("structured_outputs.grammar", lambda m: m.grammar.CopyFrom(grammar)))
    return given


def _constraint(body: SamplingBody, msg: api_pb2.GenerateRequest) -> str:
    """response_format / structured_outputs onto the constraint oneof; the parameter it came from."""
    # vLLM's older guided_* fields: ignored (as unknown fields are), they would quietly mean free output.
    for key, value in (body.model_extra or {}).items():
        if key.startswith("guided_") and value not in (None, False):
            raise bad_request(key, f"{key}: not supported; use structured_outputs (json, json_object, regex, "
                                   "choice, grammar) or response_format")
    given: list[tuple[str, Callable[[api_pb2.GenerateRequest], None]]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        given.append(("response_format", lambda m: setattr(m, "json_object", True)))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise bad_request("response_format.json_schema",
                              "response_format.json_schema: required with type json_schema")
        if rf.json_schema.schema_ is None:
            raise bad_request("response_format.json_schema.schema",
                              "response_format.json_schema.schema: required (a JSON Schema object)")
        text = _schema_text(rf.json_schema.schema_)
        given.append(("response_format.json_schema.schema", lambda m: setattr(m, "json_schema", text)))
    if body.structured_outputs is not None:
        given += _structured_outputs(body.structured_outputs)
    if not given:
        return ""
    if len(given) > 1:
        names = [param for param, _ in given]
        raise bad_request(names[1], f"{' and '.join(names)}: at most one constraint per request")
    param, put = given[0]
    put(msg)
    return param


def _set_logprobs(msg: api_pb2.GenerateRequest, k: int, param: str) -> None:
    if k < 0:
        raise bad_request(param, f"{param}: must be >= 0")
    _put(lambda: setattr(msg, "logprobs", k), param, k)


def completion_request(body: CompletionRequest) -> tuple[api_pb2.GenerateRequest, Spec]:
    msg = api_pb2.GenerateRequest()
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) > 1:
            raise bad_request("prompt", "prompt: several prompts in one request are not supported; send one "
                                        "request per prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        _put(lambda: msg.token_ids.ids.extend(prompt), "prompt", "a token id")
        msg.token_ids.SetInParent()  # an empty list is still the token-ids prompt (and refused as empty)
    if body.echo:
        raise bad_request("echo", "echo: not supported")
    if body.suffix:
        raise bad_request("suffix", "suffix: not supported")
    if body.best_of is not None and body.best_of != 1:
        raise bad_request("best_of", "best_of: not supported")
    _sampling(body, msg, body.max_tokens, "max_tokens")
    if body.logprobs is not None:
        _set_logprobs(msg, body.logprobs, "logprobs")
    constraint_param = _constraint(body, msg)
    return msg, _spec(body, False, "prompt", "max_tokens", "logprobs", body.logprobs, constraint_param)


def _content(m: ChatMessage, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages[{i}].content[{j}]",
                              f"messages[{i}].content[{j}]: only text parts are supported, not {part.type!r}")
        parts.append(part.text)
    return "".join(parts)


def chat_request(body: ChatCompletionRequest) -> tuple[api_pb2.GenerateRequest, Spec]:
    msg = api_pb2.GenerateRequest()
    msg.chat.SetInParent()
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system turn
        msg.chat.messages.add(role=role, content=_content(m, i))
    if body.tools:
        raise bad_request("tools", "tools: not supported")
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    _sampling(body, msg, max_tokens, max_param)
    k = None
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs", "top_logprobs: needs logprobs: true")
    if body.logprobs:
        k = body.top_logprobs or 0
        _set_logprobs(msg, k, "top_logprobs")
    constraint_param = _constraint(body, msg)
    return msg, _spec(body, True, "messages", max_param, "top_logprobs", k, constraint_param)


def _spec(body: SamplingBody, chat: bool, prompt_param: str, max_param: str, logprobs_param: str,
          logprobs: int | None, constraint_param: str) -> Spec:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options", "stream_options: only with stream: true")
    return Spec(chat, prompt_param, max_param, logprobs_param, logprobs, body.stream, include_usage,
                body.return_token_ids, constraint_param)


def tokenize_request(prompt: str | None, messages: list[ChatMessage] | None) -> api_pb2.TokenizeRequest:
    if (prompt is None) == (messages is None):
        raise bad_request("prompt", "give either prompt or messages")
    msg = api_pb2.TokenizeRequest()
    if prompt is not None:
        msg.text = prompt
    else:
        msg.chat.SetInParent()
        for i, m in enumerate(messages or []):
            msg.chat.messages.add(role="system" if m.role == "developer" else m.role, content=_content(m, i))
    return msg

