"""Structured output on the OpenAI-compatible HTTP API: `response_format` and vLLM's `structured_outputs`
on both endpoints, against one real scheduler + worker (random:tiny-llama, depth 2) serving HTTP,
driven with the `openai` package.

- The conversion functions directly: which constraint each parameter becomes, the grammar syntax
  heuristic, the field -> OpenAI parameter mapping (pure functions, no server).
- What the server refuses and how, whether or not it has a grammar engine: 400 `invalid_argument`
  naming the OpenAI parameter (two constraints, malformed ones, options not served, ignore_eos).
- Without a grammar engine (the worker's Hello announces none): every constraint is 400 naming its
  parameter and saying so; free output is still served. Skipped once the worker has one.
- With one (skipped until the worker announces it; the reason says so): outputs under a JSON schema
  parse and validate (`jsonschema`), under json_object are objects, under a regex match fully, under
  a choice or a grammar (EBNF or Lark) are one of its strings, on both endpoints, streamed and with
  n; each asserted only with finish_reason "stop" (random weights produce noise, so only the
  constraint makes the output valid; every schema here is bounded so that the noise must finish
  within max_tokens); an output cut by max_tokens ends "length"; a constraint that does not compile
  is 400 with the compiler's message.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import openai
import pytest
from tandem.v1 import api_pb2

from client import TandemClient
from client.local_server import TandemServer
from scheduler_svc.frontend.http_api import convert
from scheduler_svc.frontend.http_api.errors import openai_param
from scheduler_svc.frontend.http_api.schemas import ChatCompletionRequest, CompletionRequest
from tests.conftest import TINY_WORKER_ARGS

MODEL = "random:tiny-llama"
PROMPT = "a b"
CHAT = [{"role": "user", "content": "a b"}]
# Bounded everywhere (string lengths, integer ranges, item counts), so that even a random-weight model's
# noise must finish well within max_tokens under it.
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "a": {"type": "string", "maxLength": 4}},
          "required": ["b", "a"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
REGEX = r"[0-9]{2}-[a-c]{1,3}"
COLOURS = ["red", "green", "blue"]
EBNF = 'root ::= "yes" | "no"'
LARK = 'start: answer\nanswer: "yes" | "no"\n'
ENDPOINTS = ["completions", "chat"]


def _chat(**fields) -> tuple[api_pb2.GenerateRequest, convert.Spec]:
    return convert.chat_request(ChatCompletionRequest.model_validate({"messages": CHAT, **fields}))


def _completion(**fields) -> tuple[api_pb2.GenerateRequest, convert.Spec]:
    return convert.completion_request(CompletionRequest.model_validate({"prompt": PROMPT, **fields}))


# ----- conversion (pure functions) ------------------------------------------------------------------
def test_response_format_text_is_free_output():
    msg, spec = _chat(response_format={"type": "text"})
    assert msg.WhichOneof("constraint") is None and spec.constraint_param == ""
    msg, spec = _chat()
    assert msg.WhichOneof("constraint") is None and spec.constraint_param == ""


@pytest.mark.parametrize("make", [_chat, _completion])
def test_response_format_json_schema_and_json_object(make):
    msg, spec = make(response_format={"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    assert json.loads(msg.json_schema) == SCHEMA and spec.constraint_param == "response_format.json_schema.schema"
    assert list(json.loads(msg.json_schema)["properties"]) == ["b", "a"]  # the written order is kept
    msg, spec = make(response_format={"type": "json_object"})
    assert msg.WhichOneof("constraint") == "json_object" and msg.json_object
    assert spec.constraint_param == "response_format"


@pytest.mark.parametrize("make", [_chat, _completion])
def test_structured_outputs(make):
    msg, spec = make(structured_outputs={"json": SCHEMA})
    assert json.loads(msg.json_schema) == SCHEMA and spec.constraint_param == "structured_outputs.json"
    msg, _ = make(structured_outputs={"json": json.dumps(SCHEMA)})  # the schema's JSON text, as is
    assert msg.json_schema == json.dumps(SCHEMA)
    msg, spec = make(structured_outputs={"json_object": True})
    assert msg.json_object and spec.constraint_param == "structured_outputs.json_object"
    msg, spec = make(structured_outputs={"regex": r"\d+"})
    assert msg.regex == r"\d+" and spec.constraint_param == "structured_outputs.regex"
    msg, spec = make(structured_outputs={"choice": ["yes", "no"]})
    assert list(msg.choice.choices) == ["yes", "no"] and spec.constraint_param == "structured_outputs.choice"
    msg, spec = make(structured_outputs={"grammar": EBNF})
    assert (msg.grammar.text, msg.grammar.syntax) == (EBNF, api_pb2.Grammar.EBNF)
    assert spec.constraint_param == "structured_outputs.grammar"
    msg, _ = make(structured_outputs={"grammar": LARK})
    assert (msg.grammar.text, msg.grammar.syntax) == (LARK, api_pb2.Grammar.LARK)
    # Unset, null or false entries ask for nothing.
    msg, spec = make(structured_outputs={"json_object": False, "regex": None})
    assert msg.WhichOneof("constraint") is None and spec.constraint_param == ""


def test_empty_forms_still_reach_validation():
    """An empty choice list or grammar is still that constraint, so validation names it (not free output)."""
    msg, _ = _chat(structured_outputs={"choice": []})
    assert msg.WhichOneof("constraint") == "choice"
    msg, _ = _chat(structured_outputs={"grammar": ""})
    assert msg.WhichOneof("constraint") == "grammar"
    msg, _ = _chat(structured_outputs={"regex": ""})
    assert msg.WhichOneof("constraint") == "regex"


@pytest.mark.parametrize("text, syntax", [
    ('root ::= "a"', api_pb2.Grammar.EBNF),
    ('# GBNF\nroot ::= item+\nitem ::= "x" | "y"', api_pb2.Grammar.EBNF),
    ('start: "a"', api_pb2.Grammar.LARK),
    ('// a Lark grammar\n?start: expr\nexpr: NUMBER ("+" NUMBER)*\nNUMBER.2: /[0-9]+/\n', api_pb2.Grammar.LARK),
    ('%import common.WS\nstart : "x"', api_pb2.Grammar.LARK),
    ('"just a string"', api_pb2.Grammar.EBNF),  # neither: EBNF, whose compiler then says what is wrong
])
def test_grammar_syntax_heuristic(text, syntax):
    assert convert.grammar_syntax(text) == syntax


def test_field_mapping_names_the_openai_parameter():
    def param(field: str, constraint_param: str) -> str:
        return openai_param(field, "messages", "max_tokens", "top_logprobs", constraint_param)

    assert param("json_schema", "response_format.json_schema.schema") == "response_format.json_schema.schema"
    assert param("regex", "structured_outputs.regex") == "structured_outputs.regex"
    assert param("choice.choices[2]", "structured_outputs.choice") == "structured_outputs.choice[2]"
    assert param("choice.choices", "structured_outputs.choice") == "structured_outputs.choice"
    assert param("grammar.text", "structured_outputs.grammar") == "structured_outputs.grammar"
    assert param("json_object", "response_format") == "response_format"
    assert param("ignore_eos", "structured_outputs.regex") == "ignore_eos"
    assert param("temperature", "structured_outputs.regex") == "temperature"


# ----- the real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with TandemServer(MODEL, http=True, worker_args=TINY_WORKER_ARGS,
                      scheduler_args=["--pipeline-depth", "2", "--debug-check-state"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(server) -> str:
    """The server's structured-output engine ("xgrammar 0.2.9"), as GetModelInfo reports it ("": none)."""
    with TandemClient(server.address) as c:
        return c.model_info().structured_output_engine


@pytest.fixture
def with_engine(engine):
    # Fails, not skips: xgrammar is in the worker extra, so a worker without an engine is a regression.
    assert engine, "the server announces no structured-output engine"
    return engine


def _create(oa: openai.OpenAI, endpoint: str, stream: bool = False, **body):
    """One request on `endpoint` ("completions" or "chat"); body fields the SDK has no argument for
    (response_format on completions, structured_outputs, ignore_eos, guided_*) go in extra_body."""
    known = {"max_tokens", "temperature", "seed", "n", "stop", "logit_bias"}
    if endpoint == "chat":
        known.add("response_format")
    kwargs = {k: v for k, v in body.items() if k in known}
    extra = {k: v for k, v in body.items() if k not in known}
    if endpoint == "chat":
        return oa.chat.completions.create(model=MODEL, messages=CHAT, stream=stream, extra_body=extra, **kwargs)
    return oa.completions.create(model=MODEL, prompt=PROMPT, stream=stream, extra_body=extra, **kwargs)


def _text(choice) -> str:
    return choice.message.content if hasattr(choice, "message") else choice.text


def _bad(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    err = info.value
    assert err.status_code == 400 and err.body["type"] == "invalid_request_error"
    assert err.body["code"] == "invalid_argument", err.body
    return err


def test_models_lists_the_engine(server, oa, engine):
    card = oa.models.list().data[0].to_dict()
    assert card["id"] == MODEL and card["structured_output_engine"] == engine


# What the server refuses whatever its engine: (body, the parameter named, words of the message).
REFUSALS = [
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs.regex", "response_format and structured_outputs.regex: at most one constraint"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}},
     "structured_outputs.choice", "structured_outputs.regex and structured_outputs.choice: at most one"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required with type json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required (a JSON Schema object)"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}},
     "response_format.json_schema.schema", "must be a JSON object"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type: Input should be"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "not supported"),
    ({"guided_json": SCHEMA}, "guided_json", "not supported; use structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"json": "[1, 2]"}}, "structured_outputs.json", "must be a JSON object"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "must not be empty"),
    ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice[1]", "must not be empty"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex", "must not be empty"),
    ({"structured_outputs": {"grammar": " \n"}}, "structured_outputs.grammar", "must not be empty"),
    # Bytes, not characters: 32769 two-byte characters are 65538 bytes.
    ({"structured_outputs": {"regex": "é" * 32769}}, "structured_outputs.regex",
     "longer than 65536 bytes (the server's --max-grammar-bytes)"),
    ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos", "only stop tokens are allowed"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "not with a constraint"),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("body, param, words", REFUSALS, ids=[r[1] + f"-{i}" for i, r in enumerate(REFUSALS)])
def test_refusals_name_the_openai_parameter(oa, endpoint, body, param, words):
    err = _bad(lambda: _create(oa, endpoint, max_tokens=8, **body))
    assert err.body["param"] == param and words in err.body["message"], err.body


def test_options_that_ask_for_nothing_are_free_output(oa):
    """A false vLLM option or `response_format: text` is not refused: the request is served unconstrained."""
    for endpoint in ENDPOINTS:
        for body in ({"structured_outputs": {"disable_fallback": False}}, {"response_format": {"type": "text"}},
                     {"structured_outputs": {"json_object": False, "regex": None}}):
            r = _create(oa, endpoint, max_tokens=3, **body)
            assert r.choices[0].finish_reason in ("stop", "length"), body


# ----- without a grammar engine ---------------------------------------------------------------------
# Each form of constraint and the parameter its refusal names.
FORMS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"structured_outputs": {"json": SCHEMA}}, "structured_outputs.json"),
    ({"structured_outputs": {"json_object": True}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"regex": REGEX}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": COLOURS}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": EBNF}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"grammar": LARK}}, "structured_outputs.grammar"),
]


def test_without_an_engine_every_constraint_is_refused():
    """A worker without a tokenizer has no grammar engine (the only real server without one); it takes
    token-id prompts only, so the completions endpoint."""
    with TandemServer(MODEL, http=True, worker_args=[*TINY_WORKER_ARGS, "--skip-tokenizer"]) as bare:
        _refused_without_an_engine(openai.OpenAI(base_url=bare.base_url, api_key="unused", max_retries=0))


def _refused_without_an_engine(oa: openai.OpenAI) -> None:
    def create(stream: bool = False, max_tokens: int = 8, temperature: float = 1.0, **extra):
        return oa.completions.create(model=MODEL, prompt=[5, 6, 7], stream=stream, max_tokens=max_tokens,
                                     temperature=temperature, extra_body=extra)

    for body, param in FORMS:
        for stream in (False, True):  # refused before a stream starts: a 400, not an error event
            err = _bad(lambda b=body, s=stream: create(stream=s, max_tokens=8, **b))
            assert err.body["param"] == param, err.body
            assert err.body["message"].startswith(f"{param}: this server has no structured-output engine"), err.body
    r = create(max_tokens=4, temperature=0)  # free output is still served
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


# ----- with one: the outputs -----------------------------------------------------------------------
def _token_id(server, text: str) -> int:
    with TandemClient(server.address) as c:
        ids = c.tokenize(text).token_ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.fixture(scope="module")
def close_bias(server) -> dict[str, float]:
    """A logit bias that makes a random model close strings and objects as soon as the grammar lets it,
    so that free-form JSON (json_object: any object) ends within max_tokens; without the constraint the
    same bias makes a stream of `}` and `"`, not JSON."""
    return {str(_token_id(server, t)): 50.0 for t in ("}", '"')}


def _valid_person(text: str) -> None:
    import jsonschema

    jsonschema.validate(json.loads(text), PERSON)


def _valid_schema(text: str) -> None:
    import jsonschema

    jsonschema.validate(json.loads(text), SCHEMA)


def _an_object(text: str) -> None:
    assert isinstance(json.loads(text), dict), text


def _matches(text: str) -> None:
    assert re.fullmatch(REGEX, text), text


def _a_colour(text: str) -> None:
    assert text in COLOURS, text


def _yes_or_no(text: str) -> None:
    assert text in ("yes", "no"), text


# (id, body, check of a complete output, needs the closing bias)
CONSTRAINED = [
    ("response_format.json_schema", {"response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}, _valid_person,
     False),
    ("structured_outputs.json", {"structured_outputs": {"json": SCHEMA}}, _valid_schema, False),
    ("structured_outputs.json-text", {"structured_outputs": {"json": json.dumps(PERSON)}}, _valid_person, False),
    ("response_format.json_object", {"response_format": {"type": "json_object"}}, _an_object, True),
    ("structured_outputs.json_object", {"structured_outputs": {"json_object": True}}, _an_object, True),
    ("structured_outputs.regex", {"structured_outputs": {"regex": REGEX}}, _matches, False),
    ("structured_outputs.choice", {"structured_outputs": {"choice": COLOURS}}, _a_colour, False),
    ("structured_outputs.grammar", {"structured_outputs": {"grammar": EBNF}}, _yes_or_no, False),
    ("structured_outputs.grammar-lark", {"structured_outputs": {"grammar": LARK}}, _yes_or_no, False),
]
SEEDS = range(3)


async def _gather(server, calls: list[tuple[str, dict]]) -> list:
    """Requests sent at once (so constrained and free rows share batches), answers in order."""
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as aoa:
        async def one(endpoint: str, body: dict):
            if endpoint == "chat":
                kw = {k: body[k] for k in ("response_format",) if k in body}
                rest = {k: v for k, v in body.items() if k not in kw}
                return await aoa.chat.completions.create(model=MODEL, messages=CHAT, **kw, **_sdk(rest))
            return await aoa.completions.create(model=MODEL, prompt=PROMPT, **_sdk(body))
        return await asyncio.gather(*(one(e, b) for e, b in calls))


def _sdk(body: dict) -> dict:
    known = {"max_tokens", "temperature", "seed", "n", "stop", "logit_bias", "stream"}
    return {**{k: v for k, v in body.items() if k in known},
            "extra_body": {k: v for k, v in body.items() if k not in known}}


@pytest.mark.parametrize("name, body, check, bias", CONSTRAINED, ids=[c[0] for c in CONSTRAINED])
def test_constrained_outputs_are_valid(server, with_engine, close_bias, name, body, check, bias):
    """Both endpoints, several seeds at temperature 1 (noise), unconstrained requests in the same batches."""
    extra = {"logit_bias": close_bias} if bias else {}
    calls = [(endpoint, {**body, **extra, "max_tokens": 128, "temperature": 1.0, "seed": seed})
             for endpoint in ENDPOINTS for seed in SEEDS]
    free = [(endpoint, {"max_tokens": 16, "temperature": 1.0, "seed": seed})
            for endpoint in ENDPOINTS for seed in SEEDS]
    answers = asyncio.run(_gather(server, calls + free))
    for (endpoint, sent), r in zip(calls, answers, strict=False):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (endpoint, sent["seed"], choice)
        check(_text(choice))
    for r in answers[len(calls):]:
        assert r.choices[0].finish_reason in ("stop", "length")


def test_n_samples_and_streams_are_valid(server, oa, with_engine):
    import jsonschema

    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    for endpoint in ENDPOINTS:
        r = _create(oa, endpoint, n=3, max_tokens=128, temperature=1.0, seed=7, **body)
        assert len(r.choices) == 3
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(_text(choice)), PERSON)
        chunks = list(_create(oa, endpoint, stream=True, max_tokens=128, temperature=1.0, seed=8, **body))
        parts = [c.choices[0] for c in chunks if c.choices]
        text = "".join((p.delta.content or "") if endpoint == "chat" else p.text for p in parts)
        assert [p.finish_reason for p in parts if p.finish_reason] == ["stop"], parts
        jsonschema.validate(json.loads(text), PERSON)


def test_an_output_cut_by_max_tokens_ends_length(oa, with_engine):
    """max_tokens too small for the constraint: finish_reason "length", the text a prefix of a match
    (digits are single tokens in this vocabulary), never "stop"."""
    for endpoint in ENDPOINTS:
        r = _create(oa, endpoint, max_tokens=6, temperature=1.0, seed=1,
                    structured_outputs={"regex": "[0-9]{40}"})
        choice = r.choices[0]
        assert choice.finish_reason == "length" and re.fullmatch("[0-9]{6}", _text(choice)), choice


def _compiler_message(kind: str, spec: str) -> str:
    """What xgrammar itself says of `spec` (its C++ source location dropped)."""
    import xgrammar as xgr

    make = {"json_schema": xgr.Grammar.from_json_schema, "regex": xgr.Grammar.from_regex,
            "ebnf": xgr.Grammar.from_ebnf}[kind]
    with pytest.raises(RuntimeError) as info:
        make(spec)
    return str(info.value).strip().split(": ", 1)[-1]


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "json_schema", '{"type": "strin"}'),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}},
     "structured_outputs.json", "json_schema", '{"type": "object", "properties": {"a": {"type": "strin"}}}'),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex", "regex", "(a"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar", "ebnf",
     "root ::= undefined_rule"),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_constraint_that_does_not_compile_is_400_with_the_compilers_message(server, oa, with_engine, endpoint):
    for body, param, kind, spec in BAD:
        message = _compiler_message(kind, spec)
        assert message and "cc:" not in message
        for stream in (False, True):
            err = _bad(lambda b=body, s=stream: _create(oa, endpoint, stream=s, max_tokens=8, **b))
            assert err.body["param"] == param, err.body
            assert err.body["message"].startswith(f"{param}: does not compile: "), err.body
            assert message in err.body["message"], (message, err.body)
    # The same bad schema again (the core may remember the failure): the same answer.
    body, param, kind, spec = BAD[0]
    assert _bad(lambda: _create(oa, endpoint, max_tokens=8, **body)).body["message"].endswith(
        _compiler_message(kind, spec))
    # A Lark grammar goes to the Lark compiler (llguidance), not to the EBNF parser: its own message.
    err = _bad(lambda: _create(oa, endpoint, max_tokens=8, structured_outputs={"grammar": "start: undefined_rule"}))
    assert err.body["param"] == "structured_outputs.grammar", err.body
    assert err.body["message"].startswith("structured_outputs.grammar: does not compile: "), err.body
    assert "undefined_rule" in err.body["message"] and "EBNF" not in err.body["message"], err.body
    # The server serves on, constrained and free; nothing is left running.
    fresh = f"ok-{uuid.uuid4().hex[:6]}"
    r = _create(oa, endpoint, max_tokens=16, structured_outputs={"choice": [fresh]})
    assert r.choices[0].finish_reason == "stop" and _text(r.choices[0]) == fresh
    assert _create(oa, endpoint, max_tokens=4).choices[0].finish_reason in ("stop", "length")
    st = server.wait_idle()
    assert st.num_running == 0 and st.num_waiting == 0 and st.kv_blocks_free == st.kv_blocks_total
