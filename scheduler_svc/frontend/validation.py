"""Validation of public API requests: a GenerateRequest in, a schedulable Request out, or an error
naming the offending field.

Owns the rules and the defaults of every request parameter. Checks that need the model (vocabulary,
context length) use the facts of the connected worker's handshake.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass

from tandem import wire
from tandem.v1 import api_pb2

from scheduler_svc.core.request import Constraint, Request, SamplingParams
from scheduler_svc.frontend.tokenizer import TandemTokenizer

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


class InvalidArgument(Exception):
    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


@dataclass(frozen=True)
class RequestLimits:
    default_max_new_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_length: int = 256  # characters per stop string
    max_stop_token_ids: int = 64
    max_logprobs: int = 20
    max_prompt_chars: int = 1 << 20
    max_chat_messages: int = 1024
    max_cache_salt_length: int = 256
    max_samples: int = 16  # n
    max_logit_bias: int = 300  # logit_bias entries (OpenAI's limit)
    max_grammar_bytes: int = 64 << 10  # a constraint's spec (schema, regex, choices, grammar), UTF-8
    # Tokens per stream message (SGLang's --stream-interval): a stream sends once this many tokens
    # accumulated, its first token and its end at once. Fewer messages cost the front end's event
    # loop less, which is what new RPCs wait on while streams run (docs/benchmarks.md, the intake probe).
    stream_interval: int = 1


def _check(cond: bool, field: str, description: str) -> None:
    if not cond:
        raise InvalidArgument(field, description)


def prompt_ids(
    prompt_field: str | None, msg: api_pb2.GenerateRequest | api_pb2.TokenizeRequest,
    tokenizer: TandemTokenizer | None, vocab_size: int, limits: RequestLimits,
) -> tuple[str, list[int]]:
    """Tokenizes the request's prompt (text, token ids or chat); returns (field name, ids)."""
    if prompt_field is None:
        raise InvalidArgument("prompt", "one of text, token_ids or chat is required")
    if tokenizer is None and prompt_field != "token_ids":
        raise InvalidArgument(prompt_field, "this server has no tokenizer (its worker runs --skip-tokenizer): "
                                            "send token_ids")
    if prompt_field == "text":
        _check(len(msg.text) > 0, "text", "must not be empty")
        _check(len(msg.text) <= limits.max_prompt_chars, "text", f"longer than {limits.max_prompt_chars} characters")
        ids = tokenizer.encode(msg.text)
    elif prompt_field == "token_ids":
        ids = list(msg.token_ids.ids)
        _check(len(ids) > 0, "token_ids.ids", "must not be empty")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        _check(bad is None, "token_ids.ids", f"token id {bad} outside the vocabulary [0, {vocab_size})")
    else:
        messages = msg.chat.messages
        _check(len(messages) > 0, "chat.messages", "must not be empty")
        _check(len(messages) <= limits.max_chat_messages, "chat.messages",
               f"more than {limits.max_chat_messages} messages")
        for i, m in enumerate(messages):
            _check(m.role in CHAT_ROLES, f"chat.messages[{i}].role",
                   f"unknown role {m.role!r}; expected one of {sorted(CHAT_ROLES)}")
        total = sum(len(m.content) for m in messages)
        _check(total <= limits.max_prompt_chars, "chat.messages", f"longer than {limits.max_prompt_chars} characters")
        try:
            ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
        except ValueError as exc:
            raise InvalidArgument("chat.messages", f"chat template failed: {exc}") from exc
    _check(len(ids) > 0, prompt_field, "tokenizes to no tokens")
    return prompt_field, ids


def build_request(
    msg: api_pb2.GenerateRequest, req_id: str, tokenizer: TandemTokenizer | None, hello: wire.Hello,
    limits: RequestLimits,
) -> tuple[Request, list[str]]:
    """Validates `msg` fully (before anything is queued); returns the Request and its stop strings."""
    field, ids = prompt_ids(msg.WhichOneof("prompt"), msg, tokenizer, hello.vocab_size, limits)
    ctx = hello.max_context
    _check(len(ids) < ctx, field, f"prompt is {len(ids)} tokens; the context holds {ctx} (prompt + at least 1 new)")
    room = ctx - len(ids)
    if msg.HasField("max_new_tokens"):
        _check(msg.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        _check(msg.max_new_tokens <= room, "max_new_tokens",
               f"{msg.max_new_tokens} new tokens after a {len(ids)}-token prompt exceed the {ctx}-token context")
        max_new = msg.max_new_tokens
    else:
        max_new = min(limits.default_max_new_tokens, room)

    # Unset parameters take the model's defaults (its generation config), as transformers would.
    temperature = msg.temperature if msg.HasField("temperature") else hello.default_temperature
    _check(math.isfinite(temperature) and temperature >= 0, "temperature", "must be a finite number >= 0")
    top_p = msg.top_p if msg.HasField("top_p") else hello.default_top_p
    _check(math.isfinite(top_p) and 0 < top_p <= 1, "top_p", "must be in (0, 1]")
    top_k = msg.top_k if msg.HasField("top_k") else hello.default_top_k
    _check(top_k >= 0, "top_k", "must be >= 0 (0 = off)")
    min_p = msg.min_p if msg.HasField("min_p") else hello.default_min_p
    _check(math.isfinite(min_p) and 0 <= min_p <= 1, "min_p", "must be in [0, 1]")
    seed = msg.seed if msg.HasField("seed") else secrets.randbits(64)
    num_logprobs = -1
    if msg.HasField("logprobs"):
        _check(msg.logprobs <= limits.max_logprobs, "logprobs", f"at most {limits.max_logprobs}")
        num_logprobs = msg.logprobs

    stops = list(msg.stop)
    _check(not stops or tokenizer is not None, "stop",
           "stop strings need a tokenizer, and this server has none (--skip-tokenizer): use stop_token_ids")
    _check(len(stops) <= limits.max_stop_strings, "stop", f"at most {limits.max_stop_strings} stop strings")
    for i, s in enumerate(stops):
        _check(0 < len(s) <= limits.max_stop_length, f"stop[{i}]",
               f"must be 1 to {limits.max_stop_length} characters")
    stop_ids = list(msg.stop_token_ids)
    _check(len(stop_ids) <= limits.max_stop_token_ids, "stop_token_ids",
           f"at most {limits.max_stop_token_ids} stop token ids")
    for i, t in enumerate(stop_ids):
        _check(0 <= t < hello.vocab_size, f"stop_token_ids[{i}]",
               f"token id {t} outside the vocabulary [0, {hello.vocab_size})")

    penalties = _penalties(msg, hello.vocab_size, max_new, limits)
    n = 1
    if msg.HasField("n"):
        _check(1 <= msg.n <= limits.max_samples, "n", f"must be in [1, {limits.max_samples}]")
        n = msg.n

    constraint = _constraint(msg, limits)
    if constraint is not None:
        _check(not msg.ignore_eos, "ignore_eos",
               "not with a constraint: past the end of the constrained output only stop tokens are allowed")
        _constraint_served(msg.WhichOneof("constraint"), tokenizer, hello)

    request = Request(
        req_id=req_id,
        prompt_ids=ids,
        max_new_tokens=max_new,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                seed=seed, num_logprobs=num_logprobs, **penalties),
        stop_token_ids=frozenset(stop_ids),
        eos_token_ids=frozenset(hello.eos_token_ids),
        ignore_eos=msg.ignore_eos,
        cache_salt=msg.cache_salt,
        num_samples=n,
        constraint=constraint,
    )
    _check(len(msg.cache_salt) <= limits.max_cache_salt_length, "cache_salt",
           f"at most {limits.max_cache_salt_length} characters")
    return request, stops


def _penalties(msg: api_pb2.GenerateRequest, vocab_size: int, max_new: int, limits: RequestLimits) -> dict:
    """The penalty, logit-bias and min_tokens fields, checked; SamplingParams keywords (unset: off)."""
    out: dict = {}
    if msg.HasField("repetition_penalty"):
        p = msg.repetition_penalty
        _check(math.isfinite(p) and p > 0, "repetition_penalty", "must be a finite number > 0 (1 = off)")
        out["repetition_penalty"] = p
    for name in ("presence_penalty", "frequency_penalty"):
        if msg.HasField(name):
            p = getattr(msg, name)
            _check(math.isfinite(p) and -2 <= p <= 2, name, "must be in [-2, 2] (0 = off)")
            out[name] = p
    if msg.logit_bias:
        _check(len(msg.logit_bias) <= limits.max_logit_bias, "logit_bias",
               f"at most {limits.max_logit_bias} entries")
        for tok, bias in msg.logit_bias.items():
            _check(0 <= tok < vocab_size, f"logit_bias[{tok}]", f"token id outside the vocabulary [0, {vocab_size})")
            _check(math.isfinite(bias) and -100 <= bias <= 100, f"logit_bias[{tok}]", "bias must be in [-100, 100]")
        out["logit_bias"] = dict(sorted(msg.logit_bias.items()))
    if msg.HasField("min_tokens"):
        _check(msg.min_tokens <= max_new, "min_tokens", f"{msg.min_tokens} exceeds max_new_tokens ({max_new})")
        out["min_tokens"] = msg.min_tokens
    return out


_GRAMMAR_SYNTAX = {api_pb2.Grammar.EBNF: "ebnf", api_pb2.Grammar.LARK: "lark"}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _constraint_served(which: str, tokenizer: TandemTokenizer | None, hello: wire.Hello) -> None:
    """Refuses a (well-formed) constraint when this server cannot enforce one."""
    _check(tokenizer is not None, which,
           "this server has no structured-output engine (its worker runs --skip-tokenizer, and constraints need "
           "the tokenizer)")
    _check(bool(hello.grammar_engine), which,
           "this server has no structured-output engine (its worker announced none: a worker without xgrammar, "
           "or one that does not support structured output yet)")


def _constraint(msg: api_pb2.GenerateRequest, limits: RequestLimits) -> Constraint | None:
    """The `constraint` oneof as a Constraint (None: free output). Only cheap structural checks, the
    same whether or not this server can enforce it (`_constraint_served`, checked after): whether the
    constraint compiles is the worker's grammar engine's to say (ADMITTED GRAMMAR_INVALID)."""
    which = msg.WhichOneof("constraint")
    if which is None:
        return None
    cap = limits.max_grammar_bytes

    def fits(text: str, field: str) -> None:
        _check(len(text.encode()) <= cap, field, f"longer than {cap} bytes (the server's --max-grammar-bytes)")

    if which == "json_schema":
        text = msg.json_schema
        _check(text.strip() != "", "json_schema", "must not be empty (a JSON Schema document as JSON text)")
        fits(text, "json_schema")
        try:
            schema = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise InvalidArgument("json_schema", f"not valid JSON: {exc}") from None
        _check(isinstance(schema, dict) or schema is True, "json_schema",
               f"must be a JSON object (a JSON Schema document) or true, not {type(schema).__name__}")
        # Compact and in the order written (a schema's property order is its output's): equal schemas
        # written with different whitespace share one compiled grammar. `true` is the schema `{}`.
        return Constraint("json_schema", json.dumps(schema if schema is not True else {}, separators=(",", ":")))
    if which == "json_object":
        _check(msg.json_object, "json_object", "must be true (any JSON object); leave it unset for free output")
        return Constraint("json_object", "")  # the worker compiles {"type": "object"}
    if which == "regex":
        _check(msg.regex != "", "regex", "must not be empty")
        fits(msg.regex, "regex")
        return Constraint("regex", msg.regex)
    if which == "choice":
        choices = list(msg.choice.choices)
        _check(len(choices) > 0, "choice.choices", "must not be empty")
        for i, c in enumerate(choices):
            _check(c != "", f"choice.choices[{i}]", "must not be empty")
        spec = json.dumps(choices)
        fits(spec, "choice.choices")
        return Constraint("choice", spec)
    assert which == "grammar", which
    _check(msg.grammar.text.strip() != "", "grammar.text", "must not be empty")
    fits(msg.grammar.text, "grammar.text")
    kind = _GRAMMAR_SYNTAX.get(msg.grammar.syntax)
    _check(kind is not None, "grammar.syntax", f"unknown syntax {msg.grammar.syntax}; expected EBNF or LARK")
    return Constraint(kind, msg.grammar.text)
