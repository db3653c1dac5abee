"""Structured output at the gRPC API layer.

- Validation, as a function of the request and the worker handshake's facts: the constraint oneof
  becomes the Request's Constraint (compact schema text, so equal schemas share one key), or
  INVALID_ARGUMENT naming the field; a server with no grammar engine (or no tokenizer) refuses every
  well-formed constraint, saying so.
- The real server (the session's tiny scheduler + worker): malformed constraints refused naming the
  field (unary and streaming); without an engine, every constraint refused; with one (skipped until
  the worker announces it), a constraint that does not compile is INVALID_ARGUMENT with the compiler's
  message, outputs under each kind of constraint are valid (the client's and `tandem generate`'s
  arguments reach the worker's grammar engine), and a caller that gives up while its constraint
  compiles leaves nothing running.
- The client library's and the CLI's constraint arguments, as the request they build.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import grpc
import pytest
from tandem import wire
from tandem.v1 import api_pb2, api_pb2_grpc
from tokenizers import Tokenizer, models, pre_tokenizers

from client import AsyncTandemClient, TandemClient, TandemError, _convert
from scheduler_svc.core.request import Constraint
from scheduler_svc.frontend.tokenizer import TandemTokenizer
from scheduler_svc.frontend.validation import InvalidArgument, RequestLimits, build_request
from tests.conftest import TINY_WORKER_ARGS

VOCAB = ["<unk>", "<eos>", "a", "b", "c", "{", "}"]


def _tokenizer() -> TandemTokenizer:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TandemTokenizer(tok.to_str(), eos_token="<eos>")


def _hello(engine: str = "xgrammar 0.2.9") -> wire.Hello:
    return wire.Hello(worker_id="w", pid=1, model_name="m", vocab_size=len(VOCAB), eos_token_ids=[1],
                      max_context=64, dtype="float32", device="cpu", num_blocks=16, block_size=4,
                      max_num_tokens=32, max_num_rows=4, max_blocks_per_row=16, tokenizer_json=b"",
                      grammar_engine=engine)


TOKENIZER = _tokenizer()
LIMITS = RequestLimits()


def _msg(**fields) -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=[2, 3]), max_new_tokens=8, **fields)


def _build(msg: api_pb2.GenerateRequest, hello: wire.Hello | None = None, tokenizer=TOKENIZER,
           limits: RequestLimits = LIMITS):
    req, _ = build_request(msg, "r-1", tokenizer, hello or _hello(), limits)
    return req


def _refused(msg: api_pb2.GenerateRequest, **kw) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        _build(msg, **kw)
    return info.value


# ----- well-formed constraints ---------------------------------------------------------------------
def test_no_constraint_is_free_output():
    assert _build(_msg()).constraint is None


def test_json_schema_is_kept_compact_in_its_written_order():
    schema = '{"type": "object",\n "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}'
    c = _build(_msg(json_schema=schema)).constraint
    compact = '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}'
    assert c == Constraint("json_schema", compact)
    # Whitespace does not make another grammar: the same key, compiled once.
    assert _build(_msg(json_schema=json.dumps(json.loads(schema), indent=4))).constraint.key == c.key


def test_json_schema_true_is_the_empty_schema():
    assert _build(_msg(json_schema="true")).constraint == Constraint("json_schema", "{}")


def test_json_object_regex_choice_grammar():
    assert _build(_msg(json_object=True)).constraint == Constraint("json_object", "")
    assert _build(_msg(regex=r"\d{4}-\d{2}")).constraint == Constraint("regex", r"\d{4}-\d{2}")
    c = _build(_msg(choice=api_pb2.ChoiceList(choices=["yes", "no", "naïve"]))).constraint
    assert c.kind == "choice" and json.loads(c.spec) == ["yes", "no", "naïve"]
    ebnf = 'root ::= "a" | "b"'
    assert _build(_msg(grammar=api_pb2.Grammar(text=ebnf))).constraint == Constraint("ebnf", ebnf)
    lark = 'start: "a" | "b"'
    g = api_pb2.Grammar(text=lark, syntax=api_pb2.Grammar.LARK)
    assert _build(_msg(grammar=g)).constraint == Constraint("lark", lark)


def test_a_text_prompt_with_a_constraint():
    msg = api_pb2.GenerateRequest(text="a b c", regex="[abc]+")
    assert _build(msg).constraint == Constraint("regex", "[abc]+")


def test_each_sample_of_n_shares_the_constraint():
    from scheduler_svc.frontend import sample_group

    req = _build(_msg(regex="a+", n=3))
    assert [r.constraint for r in sample_group.expand(req)] == [Constraint("regex", "a+")] * 3


def test_the_size_cap_counts_bytes():
    small = RequestLimits(max_grammar_bytes=10)
    assert _build(_msg(regex="é" * 5), limits=small).constraint.spec == "é" * 5  # 10 bytes
    for fields, field in (({"regex": "é" * 6}, "regex"),
                          ({"json_schema": '{"type": "object"}'}, "json_schema"),
                          ({"choice": api_pb2.ChoiceList(choices=["aaaa", "bbbb"])}, "choice.choices"),
                          ({"grammar": api_pb2.Grammar(text='root ::= "abc"')}, "grammar.text")):
        err = _refused(_msg(**fields), limits=small)
        assert err.field == field and "longer than 10 bytes" in err.description


def test_a_server_without_an_engine_refuses_every_constraint():
    """The handshake's facts as validation sees them: a worker that announced no grammar engine, or one
    without a tokenizer (--skip-tokenizer). A malformed constraint is still refused for what is wrong
    with it, first; free output is still served."""
    for fields, field in (({"json_schema": "{}"}, "json_schema"), ({"json_object": True}, "json_object"),
                          ({"regex": "a"}, "regex"), ({"choice": api_pb2.ChoiceList(choices=["a"])}, "choice"),
                          ({"grammar": api_pb2.Grammar(text="root ::= x")}, "grammar")):
        err = _refused(_msg(**fields), hello=_hello(engine=""))
        assert err.field == field and "no structured-output engine" in err.description
        err = _refused(_msg(**fields), tokenizer=None)
        assert err.field == field and "--skip-tokenizer" in err.description
    for fields, field, words in (({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
                                 ({"choice": api_pb2.ChoiceList(choices=["a", ""])}, "choice.choices[1]", "empty"),
                                 ({"regex": "a", "ignore_eos": True}, "ignore_eos", "only stop tokens")):
        for kw in ({"hello": _hello(engine="")}, {"tokenizer": None}):
            err = _refused(_msg(**fields), **kw)
            assert err.field == field and words in err.description, (kw, err)
    assert _build(_msg(), hello=_hello(engine="")).constraint is None


# ----- the real server: gRPC ------------------------------------------------------------------------
# The session's tiny server (random:tiny-llama, depth 2): random weights produce noise, so only the
# constraint makes an output valid; every constraint here is bounded so the noise must finish.
PROMPT = [2, 3, 4]


def _call(server, msg: api_pb2.GenerateRequest, stream: bool = False, timeout: float = 60):
    """One Generate (or GenerateStream, read to its end) with the raw message: the answer, or the
    TandemError the client library makes of the refusal."""
    with grpc.insecure_channel(server.address) as ch:
        stub = api_pb2_grpc.TandemStub(ch)
        try:
            if stream:
                return list(stub.GenerateStream(msg, timeout=timeout))
            return stub.Generate(msg, timeout=timeout)
        except grpc.RpcError as err:
            return _convert.error_from_rpc(err)


def _refusal(server, msg: api_pb2.GenerateRequest, stream: bool = False) -> TandemError:
    err = _call(server, msg, stream)
    assert isinstance(err, TandemError), err
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
    assert len(err.field_violations) == 1, err
    return err


@pytest.fixture(scope="module")
def engine(tiny) -> str:
    with TandemClient(tiny.address) as c:
        return c.model_info().structured_output_engine


@pytest.fixture
def with_engine(engine):
    # Fails, not skips: xgrammar is in the worker extra, so a worker without an engine is a regression.
    assert engine, "the tiny server announces no structured-output engine"
    return engine


MALFORMED = [
    ({"json_schema": ""}, "json_schema", "must not be empty"),
    ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
    ({"json_schema": '{"maximum": NaN}'}, "json_schema", "not valid JSON"),
    ({"json_schema": "[1, 2]"}, "json_schema", "must be a JSON object"),
    ({"json_schema": "false"}, "json_schema", "must be a JSON object"),
    ({"json_schema": '"string"'}, "json_schema", "must be a JSON object"),
    ({"json_object": False}, "json_object", "must be true"),
    ({"regex": ""}, "regex", "must not be empty"),
    ({"choice": api_pb2.ChoiceList()}, "choice.choices", "must not be empty"),
    ({"choice": api_pb2.ChoiceList(choices=["a", ""])}, "choice.choices[1]", "must not be empty"),
    ({"grammar": api_pb2.Grammar(text=" \n")}, "grammar.text", "must not be empty"),
    ({"grammar": api_pb2.Grammar(text="root ::= x", syntax=7)}, "grammar.syntax", "unknown syntax"),
    ({"regex": "a+", "ignore_eos": True}, "ignore_eos", "only stop tokens"),
    # --max-grammar-bytes (default 64 KiB) counts bytes: 32769 two-byte characters are 65538 bytes.
    ({"regex": "é" * 32769}, "regex", "longer than 65536 bytes"),
    ({"choice": api_pb2.ChoiceList(choices=["x" * 40000, "y" * 40000])}, "choice.choices", "longer than 65536"),
]


@pytest.mark.parametrize("fields, field, words", MALFORMED, ids=[f"{m[1]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_constraints_are_invalid_argument_naming_the_field(tiny, fields, field, words):
    """Whether or not the server has a grammar engine: refused before anything is queued."""
    msg = _msg(**fields)
    for stream in (False, True):
        err = _refusal(tiny, msg, stream)
        assert err.field_violations[0][0] == field and words in err.field_violations[0][1], err
        assert err.message.startswith(f"{field}: "), err


def test_without_an_engine_every_constraint_is_refused(servers):
    """A worker without a tokenizer has no grammar engine (the only real server without one)."""
    bare = servers.get(worker_args=(*TINY_WORKER_ARGS, "--skip-tokenizer"))
    for fields, field in (({"json_schema": "{}"}, "json_schema"), ({"json_object": True}, "json_object"),
                          ({"regex": "a"}, "regex"), ({"choice": api_pb2.ChoiceList(choices=["a"])}, "choice"),
                          ({"grammar": api_pb2.Grammar(text='root ::= "a"')}, "grammar")):
        err = _refusal(bare, _msg(**fields))
        assert err.field_violations[0] == (field, err.field_violations[0][1])
        assert "no structured-output engine" in err.field_violations[0][1], err
    with TandemClient(bare.address) as c:  # free output is still served
        assert len(c.generate(token_ids=PROMPT, max_new_tokens=3).token_ids) >= 1


def _compiler_message(kind: str, spec: str) -> str:
    """What xgrammar itself says of `spec` (its C++ source location dropped)."""
    import xgrammar as xgr

    make = {"json_schema": xgr.Grammar.from_json_schema, "regex": xgr.Grammar.from_regex,
            "ebnf": xgr.Grammar.from_ebnf}[kind]
    with pytest.raises(RuntimeError) as info:
        make(spec)
    return str(info.value).strip().split(": ", 1)[-1]


@pytest.mark.parametrize("fields, field, kind, spec", [
    ({"json_schema": '{"type": "strin"}'}, "json_schema", "json_schema", '{"type": "strin"}'),
    ({"regex": "(a"}, "regex", "regex", "(a"),
    ({"grammar": api_pb2.Grammar(text="root ::= undefined_rule")}, "grammar", "ebnf", "root ::= undefined_rule"),
])
def test_a_constraint_that_does_not_compile_is_invalid_argument_with_the_compilers_message(
        tiny, with_engine, fields, field, kind, spec):
    message = _compiler_message(kind, spec)
    assert message and "cc:" not in message
    for stream, n in ((False, 1), (True, 1), (False, 3)):
        err = _refusal(tiny, _msg(n=n, **fields), stream)
        assert err.field_violations[0][0] == field, err
        assert err.field_violations[0][1].startswith("does not compile: ") and message in err.field_violations[0][1]
    st = tiny.wait_idle()  # nothing of the refused requests (n samples included) is left in the core
    assert st.num_running == 0 and st.num_waiting == 0 and st.kv_blocks_free == st.kv_blocks_total


def _close_bias(server) -> dict[int, float]:
    """Makes a random model close strings and objects as soon as the grammar lets it, so that any-object
    JSON ends within max_new_tokens (the same bias unconstrained makes a stream of `}` and `"`)."""
    with TandemClient(server.address) as c:
        ids = [c.tokenize(t).token_ids for t in ("}", '"')]
    assert all(len(i) == 1 for i in ids), ids
    return {i[0]: 50.0 for i in ids}


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": -5, "maximum": 500},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"], "additionalProperties": False}


def test_constrained_outputs_are_valid(tiny, with_engine):
    """The client's constraint arguments reach the worker's grammar engine: each output, at temperature 1,
    ends EOS and is valid; streamed text likewise. Sent at once, so constrained rows share batches."""
    import jsonschema

    bias = _close_bias(tiny)
    checks = [
        ({"json_schema": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ({"json_object": True, "logit_bias": bias}, lambda t: _assert(isinstance(json.loads(t), dict), t)),
        ({"regex": r"[a-e]{1,4}@[0-9]{2}"}, lambda t: _assert(re.fullmatch(r"[a-e]{1,4}@[0-9]{2}", t), t)),
        ({"choice": ["sun", "moon", "naïve"]}, lambda t: _assert(t in ("sun", "moon", "naïve"), t)),
        ({"grammar": 'root ::= "(" [0-9] ("+" [0-9])? ")"'},
         lambda t: _assert(re.fullmatch(r"\([0-9](\+[0-9])?\)", t), t)),
    ]
    calls = [(kw, check, seed) for kw, check in checks for seed in range(3)]

    async def run():
        async with AsyncTandemClient(tiny.address, timeout=120) as c:
            async def streamed(seed: int):
                return [x async for x in c.generate_stream(token_ids=PROMPT, max_new_tokens=96, temperature=1.0,
                                                           seed=seed, regex="[xyz]{3}")]
            common = {"token_ids": PROMPT, "max_new_tokens": 96, "temperature": 1.0}
            return await asyncio.gather(*(c.generate(seed=seed, **kw, **common) for kw, _, seed in calls),
                                        *(streamed(seed) for seed in range(3)))

    answers = asyncio.run(run())
    for (kw, check, seed), r in zip(calls, answers, strict=False):
        assert r.finish_reason == "eos", (kw, seed, r)
        check(r.text)
    for chunks in answers[len(calls):]:
        assert chunks[-1].completion.finish_reason == "eos", chunks[-1]
        assert re.fullmatch("[xyz]{3}", "".join(x.text for x in chunks)), chunks


def _assert(ok: object, text: str) -> None:
    assert ok, text


def test_cli_constraint_against_the_server(tiny, with_engine, capsys):
    from client.cli import main

    args = ["generate", "a b", "--address", tiny.address, "--max-new-tokens", "16", "--temperature", "1",
            "--seed", "5"]
    assert main([*args, "--regex", "[0-9]{3}"]) == 0
    out = capsys.readouterr()
    assert re.fullmatch(r"[0-9]{3}\n", out.out) and "eos" in out.err, out
    assert main([*args, "--choice", "left", "--choice", "right"]) == 0
    assert capsys.readouterr().out in ("left\n", "right\n")
    assert main([*args, "--regex", "(a"]) == 1
    out = capsys.readouterr()
    assert "INVALID_ARGUMENT" in out.err and "regex" in out.err and "does not compile" in out.err, out


def _slow_schema() -> dict:
    """A schema that takes xgrammar about a second to compile (800 optional properties, new each call so
    that no cache holds it), whose output starts with 1500 digits (one token each in this vocabulary)."""
    tag = uuid.uuid4().hex[:8]
    props = {"z": {"type": "string", "pattern": "^[0-9]{1500}$"}}
    props.update({f"p{i}_{tag}": {"type": "string", "maxLength": 4} for i in range(800)})
    schema = {"type": "object", "properties": props, "required": ["z"], "title": tag}
    assert len(json.dumps(schema)) < 64 << 10
    return schema


def test_a_caller_gone_while_its_constraint_compiles_leaves_nothing_running(tiny, with_engine):
    """A deadline that expires while the worker compiles: the request is aborted in the core too, so it
    never runs once the compile is done (it would take 1500+ steps). A second request with the same
    schema waits for the same compile; when it has finished, nothing may be running."""
    schema = json.dumps(_slow_schema())
    with TandemClient(tiny.address) as c:
        t0 = time.monotonic()
        with pytest.raises(TandemError) as info:
            c.generate(token_ids=PROMPT, json_schema=schema, max_new_tokens=1900, temperature=1.0, timeout=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
        r = c.generate(token_ids=PROMPT, json_schema=schema, max_new_tokens=8, temperature=1.0, timeout=120)
        assert r.finish_reason == "length" and r.text.startswith('{"z":"'), r
        assert time.monotonic() - t0 > 0.3  # it did wait for the compile
    st = tiny.wait_idle(timeout=1.0)
    assert st.num_running == 0 and st.num_waiting == 0 and st.kv_blocks_free == st.kv_blocks_total, st


# ----- the client library and `tandem generate` ------------------------------------------------------
def test_client_builds_each_constraint():
    from client._convert import build_generate_request

    assert json.loads(build_generate_request("p", json_schema={"type": "object"}).json_schema) == {"type": "object"}
    assert build_generate_request("p", json_schema='{"type": "object"}').json_schema == '{"type": "object"}'
    assert build_generate_request("p", json_object=True).WhichOneof("constraint") == "json_object"
    assert build_generate_request("p", regex="a+").regex == "a+"
    assert list(build_generate_request("p", choice=["a", "b"]).choice.choices) == ["a", "b"]
    g = build_generate_request("p", grammar='start: "a"', grammar_syntax="lark").grammar
    assert (g.text, g.syntax) == ('start: "a"', api_pb2.Grammar.LARK)
    assert build_generate_request("p", grammar='root ::= "a"').grammar.syntax == api_pb2.Grammar.EBNF
    assert build_generate_request("p").WhichOneof("constraint") is None
    assert build_generate_request("p", json_object=False).WhichOneof("constraint") is None
    with pytest.raises(ValueError, match="at most one constraint"):
        build_generate_request("p", regex="a", choice=["a"])
    with pytest.raises(ValueError, match="grammar_syntax"):
        build_generate_request("p", grammar="x", grammar_syntax="peg")
    with pytest.raises(ValueError, match="choice"):
        build_generate_request("p", choice="ab")


def test_cli_constraint_flags(tmp_path):
    from client.cli import _constraint_kwargs, build_parser

    parser = build_parser()

    def kwargs(*flags: str) -> dict:
        args = parser.parse_args(["generate", "hi", *flags])
        return _constraint_kwargs(args, args.subparser)

    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "a"')
    assert kwargs() == {}
    assert kwargs("--json-schema", '{"type": "integer"}') == {"json_schema": '{"type": "integer"}'}
    assert kwargs("--json-schema", str(schema)) == {"json_schema": '{"type": "object"}'}
    assert kwargs("--json-object") == {"json_object": True}
    assert kwargs("--regex", "[0-9]+") == {"regex": "[0-9]+"}
    assert kwargs("--choice", "yes", "--choice", "no") == {"choice": ["yes", "no"]}
    assert kwargs("--grammar", str(grammar), "--grammar-syntax", "lark") == {"grammar": 'start: "a"',
                                                                            "grammar_syntax": "lark"}
    for bad in (("--regex", "a", "--json-object"), ("--json-schema", str(tmp_path / "missing.json")),
                ("--grammar", str(tmp_path / "missing"))):
        with pytest.raises(SystemExit) as exit_info:
            kwargs(*bad)
        assert exit_info.value.code == 2
