"""Structured output on the OpenAI-compatible HTTP API: `response_format` and vLLM's `structured_outputs`
become the GenerateRequest's constraint (hence the Request's Constraint), two at once are refused
naming both, and every error names the OpenAI parameter the client sent.

Most of it needs no worker: the conversion functions directly, and the real FastAPI app served by
uvicorn in this process in front of a stand-in engine that records what it was asked and answers with
a fixed completion (or the compiler's refusal), driven with the `openai` package. The end-to-end
checks against a real scheduler + worker (outputs that parse and validate) wait for the worker's
grammar engine: they run with TANDEM_STRUCTURED_E2E=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time

import openai
import pytest
from tandem import wire
from tandem.v1 import api_pb2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from scheduler_svc.engine_client import GrammarInvalid
from scheduler_svc.http_api import convert
from scheduler_svc.http_api.app import create_app
from scheduler_svc.http_api.errors import ApiError, openai_param
from scheduler_svc.http_api.schemas import ChatCompletionRequest, CompletionRequest
from scheduler_svc.http_api.serve import HttpConfig, HttpServer
from scheduler_svc.metrics import Metrics
from scheduler_svc.request import Constraint, FinishReason
from scheduler_svc.tokenizer import TandemTokenizer
from scheduler_svc.validation import RequestLimits

CHAT = [{"role": "user", "content": "a b"}]
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string", "maxLength": 4}},
          "required": ["a", "b"], "additionalProperties": False}
EBNF = 'root ::= "yes" | "no"'
LARK = 'start: answer\nanswer: "yes" | "no"\n'


def _chat(**fields) -> tuple[api_pb2.GenerateRequest, convert.Spec]:
    return convert.chat_request(ChatCompletionRequest.model_validate({"messages": CHAT, **fields}))


def _completion(**fields) -> tuple[api_pb2.GenerateRequest, convert.Spec]:
    return convert.completion_request(CompletionRequest.model_validate({"prompt": "a b", **fields}))


def _api_error(make, **fields) -> ApiError:
    with pytest.raises(ApiError) as info:
        make(**fields)
    return info.value


# ----- conversion ---------------------------------------------------------------------------------
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


def test_two_constraints_are_refused_naming_both():
    err = _api_error(_chat, response_format={"type": "json_object"}, structured_outputs={"regex": "a"})
    assert err.status == 400 and "response_format" in err.message and "structured_outputs.regex" in err.message
    err = _api_error(_completion, structured_outputs={"regex": "a", "choice": ["a"]})
    assert err.status == 400 and "structured_outputs.regex and structured_outputs.choice" in err.message
    assert err.param == "structured_outputs.choice"


def test_response_format_json_schema_needs_a_schema():
    err = _api_error(_chat, response_format={"type": "json_schema"})
    assert err.param == "response_format.json_schema"
    err = _api_error(_chat, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert err.param == "response_format.json_schema.schema"


def test_options_tandem_does_not_serve_are_refused_by_name():
    err = _api_error(_chat, structured_outputs={"structural_tag": "{}"})
    assert err.param == "structured_outputs.structural_tag" and "not supported" in err.message
    err = _api_error(_completion, guided_json=SCHEMA)
    assert err.param == "guided_json" and "structured_outputs" in err.message
    _chat(structured_outputs={"regex": "a", "disable_fallback": False})  # a false option asks for nothing


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


# ----- the app, in front of a stand-in engine -----------------------------------------------------
VOCAB = ["<unk>", "<eos>", "a", "b", "yes", "no", "{", "}"]


def _tokenizer() -> TandemTokenizer:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins the words with spaces
    return TandemTokenizer(tok.to_str(), chat_template="{% for m in messages %}{{ m.content }} {% endfor %}",
                           eos_token="<eos>")


class FakeEngine:
    """What the HTTP app uses of an EngineClient. Every admitted request gets the tokens "yes" + EOS;
    a constraint whose spec names the type `"strin"` fails to compile, as xgrammar says it."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.serving, self.draining = True, False
        self.requests: list = []
        self._tokenizer = _tokenizer()
        self._hello = wire.Hello(worker_id="w", pid=1, model_name="fake", vocab_size=len(VOCAB), eos_token_ids=[1],
                                 max_context=64, dtype="float32", device="cpu", num_blocks=16, block_size=4,
                                 max_num_tokens=32, max_num_rows=4, max_blocks_per_row=16, tokenizer_json=b"",
                                 grammar_engine="fake 1")

    def hello(self) -> wire.Hello:
        return self._hello

    def tokenizer(self) -> TandemTokenizer:
        return self._tokenizer

    async def submit(self, handle) -> None:
        req = handle.request
        self.requests.append(req)
        if req.constraint is not None and '"strin"' in req.constraint.spec:
            raise GrammarInvalid('Unsupported type "strin"')
        for token, finish in ((4, None), (1, FinishReason.EOS)):
            req.output_ids.append(token)
            handle.on_token(token, None, None, finish)
        handle.complete(FinishReason.EOS)

    def abort(self, handle) -> None:
        pass


@pytest.fixture(scope="module")
def app_server():
    engine = FakeEngine()
    loop = asyncio.new_event_loop()
    http = HttpServer(create_app(engine, RequestLimits(max_grammar_bytes=256)), HttpConfig("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(http.start(), loop).result(10)
    try:
        yield engine, openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0)
    finally:
        asyncio.run_coroutine_threadsafe(http.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def _bad(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value


def test_http_round_trips_build_the_constraint(app_server):
    engine, oa = app_server
    r = oa.chat.completions.create(model="fake", messages=CHAT, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    assert r.choices[0].message.content == "yes" and r.choices[0].finish_reason == "stop"
    c = engine.requests[-1].constraint
    assert c.kind == "json_schema" and json.loads(c.spec) == SCHEMA

    oa.chat.completions.create(model="fake", messages=CHAT, response_format={"type": "json_object"})
    assert engine.requests[-1].constraint == Constraint("json_object", "")
    oa.chat.completions.create(model="fake", messages=CHAT, response_format={"type": "text"})
    assert engine.requests[-1].constraint is None

    cases = [({"json": SCHEMA}, "json_schema"), ({"json_object": True}, "json_object"), ({"regex": "yes|no"}, "regex"),
             ({"choice": ["yes", "no"]}, "choice"), ({"grammar": EBNF}, "ebnf"), ({"grammar": LARK}, "lark")]
    for so, kind in cases:
        r = oa.completions.create(model="fake", prompt="a b", extra_body={"structured_outputs": so})
        assert r.choices[0].text == "yes"
        assert engine.requests[-1].constraint.kind == kind
        oa.chat.completions.create(model="fake", messages=CHAT, extra_body={"structured_outputs": so})
        assert engine.requests[-1].constraint.kind == kind
    assert engine.requests[-1].constraint == Constraint("lark", LARK)

    # n samples: each sample is its own request under the one constraint.
    r = oa.chat.completions.create(model="fake", messages=CHAT, n=2, extra_body={"structured_outputs": {"regex": "y"}})
    assert len(r.choices) == 2 and [q.constraint for q in engine.requests[-2:]] == [Constraint("regex", "y")] * 2


def test_http_stream_with_a_constraint(app_server):
    engine, oa = app_server
    chunks = list(oa.chat.completions.create(model="fake", messages=CHAT, stream=True,
                                             response_format={"type": "json_object"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "yes"
    assert engine.requests[-1].constraint == Constraint("json_object", "")


def test_http_errors_name_the_openai_parameter(app_server):
    engine, oa = app_server
    n = len(engine.requests)
    err = _bad(lambda: oa.chat.completions.create(model="fake", messages=CHAT, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}))
    assert err.body["param"] == "response_format.json_schema.schema"
    assert err.body["message"] == 'response_format.json_schema.schema: does not compile: Unsupported type "strin"'
    err = _bad(lambda: oa.completions.create(model="fake", prompt="a b",
                                             extra_body={"structured_outputs": {"json": "{not json"}}))
    assert err.body["param"] == "structured_outputs.json" and "not valid JSON" in err.body["message"]
    err = _bad(lambda: oa.completions.create(model="fake", prompt="a b",
                                             extra_body={"structured_outputs": {"choice": ["a", ""]}}))
    assert err.body["param"] == "structured_outputs.choice[1]"
    err = _bad(lambda: oa.completions.create(model="fake", prompt="a b",
                                             extra_body={"structured_outputs": {"regex": "a" * 257}}))
    assert err.body["param"] == "structured_outputs.regex" and "longer than 256 bytes" in err.body["message"]
    err = _bad(lambda: oa.chat.completions.create(model="fake", messages=CHAT, extra_body={
        "structured_outputs": {"regex": "a"}, "ignore_eos": True}))
    assert err.body["param"] == "ignore_eos"
    err = _bad(lambda: oa.chat.completions.create(model="fake", messages=CHAT, response_format={"type": "json_object"},
                                                  extra_body={"structured_outputs": {"choice": ["a"]}}))
    assert "response_format and structured_outputs.choice" in err.body["message"]
    err = _bad(lambda: oa.chat.completions.create(model="fake", messages=CHAT, response_format={"type": "xml"}))
    assert err.body["param"] == "response_format" and "type" in err.body["message"]
    assert len(engine.requests) == n + 1  # only the one that reached the compiler was submitted


def test_http_without_an_engine(app_server):
    engine, oa = app_server
    engine._hello.grammar_engine = ""
    try:
        err = _bad(lambda: oa.chat.completions.create(model="fake", messages=CHAT,
                                                      response_format={"type": "json_object"}))
        assert err.body["param"] == "response_format" and "no structured-output engine" in err.body["message"]
        assert oa.chat.completions.create(model="fake", messages=CHAT).choices[0].message.content == "yes"
    finally:
        engine._hello.grammar_engine = "fake 1"


# ----- end to end: a real scheduler + worker ------------------------------------------------------
E2E = os.environ.get("TANDEM_STRUCTURED_E2E") == "1"
MODEL = "random:tiny-llama"
# Bounded everywhere, so that even a random-weight model's noise must finish within max_tokens.
E2E_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def e2e_server():
    from client.local_server import TandemServer
    from tests.conftest import TINY_WORKER_ARGS

    with TandemServer(MODEL, http=True, worker_args=TINY_WORKER_ARGS,
                      scheduler_args=["--pipeline-depth", "2", "--debug-check-state"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def e2e(e2e_server):
    from client import TandemClient

    with TandemClient(e2e_server.address) as grpc_client:
        info = grpc_client.model_info()
        yield e2e_server, grpc_client, info, openai.OpenAI(base_url=e2e_server.base_url, api_key="unused",
                                                          max_retries=0)


def test_e2e_without_an_engine_constraints_are_refused(e2e):
    """Until the worker announces its grammar engine (or with a worker that has none)."""
    server, grpc_client, info, oa = e2e
    if info.structured_output_engine:
        pytest.skip(f"the worker has a grammar engine ({info.structured_output_engine})")
    err = _bad(lambda: oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": E2E_SCHEMA}}))
    assert err.body["param"] == "response_format.json_schema.schema"
    assert "no structured-output engine" in err.body["message"]
    from client import TandemError

    with pytest.raises(TandemError) as info_err:
        grpc_client.generate("a b", max_new_tokens=8, regex="a+")
    assert info_err.value.field_violations[0][0] == "regex"


@pytest.mark.skipif(not E2E, reason="needs the worker's grammar engine: TANDEM_STRUCTURED_E2E=1")
def test_e2e_constrained_outputs_are_valid(e2e):
    jsonschema = pytest.importorskip("jsonschema")
    server, grpc_client, info, oa = e2e
    assert info.structured_output_engine
    for seed in range(4):
        r = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=96, temperature=1.0, seed=seed,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "p", "schema": E2E_SCHEMA}})
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), E2E_SCHEMA)
        r = oa.completions.create(model=MODEL, prompt="a b", max_tokens=16, temperature=1.0, seed=seed,
                                  extra_body={"structured_outputs": {"regex": r"[0-9]{2}-[a-c]{1,3}"}})
        if r.choices[0].finish_reason == "stop":
            assert re.fullmatch(r"[0-9]{2}-[a-c]{1,3}", r.choices[0].text)
        r = oa.completions.create(model=MODEL, prompt="a b", max_tokens=16, temperature=1.0, seed=seed,
                                  extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].text in ("red", "green", "blue")
        r = oa.completions.create(model=MODEL, prompt="a b", max_tokens=16, temperature=1.0, seed=seed,
                                  extra_body={"structured_outputs": {"grammar": EBNF}})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].text in ("yes", "no")
        g = grpc_client.generate("a b", max_new_tokens=32, temperature=1.0, seed=seed, json_object=True)
        if g.finish_reason == "eos":
            assert isinstance(json.loads(g.text), dict)


@pytest.mark.skipif(not E2E, reason="needs the worker's grammar engine: TANDEM_STRUCTURED_E2E=1")
def test_e2e_compile_errors_are_400_with_the_compilers_message(e2e):
    server, grpc_client, info, oa = e2e
    err = _bad(lambda: oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}))
    assert err.body["param"] == "response_format.json_schema.schema" and "strin" in err.body["message"]
    err = _bad(lambda: oa.completions.create(model=MODEL, prompt="a b", max_tokens=8,
                                             extra_body={"structured_outputs": {"regex": "(a"}}))
    assert err.body["param"] == "structured_outputs.regex"
    err = _bad(lambda: oa.completions.create(model=MODEL, prompt="a b", max_tokens=8,
                                             extra_body={"structured_outputs": {"grammar": "root ::= undefined_rule"}}))
    assert err.body["param"] == "structured_outputs.grammar"
    # The server still serves afterwards, constrained or not.
    t = time.monotonic()
    assert oa.completions.create(model=MODEL, prompt="a b", max_tokens=4).choices[0].text is not None
    assert time.monotonic() - t < 30
