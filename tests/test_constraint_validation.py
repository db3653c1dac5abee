"""Structured output at the API layer, without a worker: the constraint oneof becomes the Request's
Constraint (or INVALID_ARGUMENT naming the field), the Submit carries it, a GRAMMAR_INVALID answer is
INVALID_ARGUMENT under the constraint's field with the compiler's message, and a caller that gives up
while the core is still compiling has its request aborted in the core."""

from __future__ import annotations

import asyncio
import itertools
import json

import grpc
import pytest
from tandem import wire
from tandem.v1 import api_pb2
from tandem.v1 import core_pb2 as cpb
from tokenizers import Tokenizer, models, pre_tokenizers

from scheduler_svc import core_link as cl
from scheduler_svc import frontend
from scheduler_svc.detokenizer import OutputText
from scheduler_svc.engine_client import EngineClient, GrammarInvalid, Unavailable
from scheduler_svc.handle import RequestHandle
from scheduler_svc.metrics import Metrics
from scheduler_svc.request import Constraint
from scheduler_svc.tokenizer import TandemTokenizer
from scheduler_svc.validation import InvalidArgument, RequestLimits, build_request

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
    from scheduler_svc import sample_group

    req = _build(_msg(regex="a+", n=3))
    assert [r.constraint for r in sample_group.expand(req)] == [Constraint("regex", "a+")] * 3


# ----- malformed ones: INVALID_ARGUMENT naming the field --------------------------------------------
@pytest.mark.parametrize("fields, field, words", [
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
])
def test_malformed_constraints(fields, field, words):
    err = _refused(_msg(**fields))
    assert err.field == field and words in err.description, err


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
    for fields, field in (({"json_schema": "{}"}, "json_schema"), ({"json_object": True}, "json_object"),
                          ({"regex": "a"}, "regex"), ({"choice": api_pb2.ChoiceList(choices=["a"])}, "choice"),
                          ({"grammar": api_pb2.Grammar(text="root ::= x")}, "grammar")):
        err = _refused(_msg(**fields), hello=_hello(engine=""))
        assert err.field == field and "no structured-output engine" in err.description
        err = _refused(_msg(**fields), tokenizer=None)
        assert err.field == field and "--skip-tokenizer" in err.description
    assert _build(_msg(), hello=_hello(engine="")).constraint is None  # free output still served


# ----- the core link: Submit, GRAMMAR_INVALID, a caller gone while compiling ------------------------
class _Front:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    def send(self, kind: bytes, header: bytes) -> None:
        self.sent.append((kind, header))


class _Core:
    def poll(self):
        return None


def _engine() -> EngineClient:
    """An EngineClient with its core link replaced by a recorder (no core process)."""
    ec = EngineClient.__new__(EngineClient)
    ec.draining, ec._hello, ec._tokenizer = False, _hello(), TOKENIZER
    ec._uids, ec._admits, ec.handles, ec.metrics = itertools.count(1), {}, {}, Metrics()
    ec.front, ec.core = _Front(), _Core()
    return ec


def _admitted(ec: EngineClient, uid: int, refusal: int, message: str = "") -> None:
    ec._dispatch(cl.KIND_ADMITTED, cpb.Admitted(uid=uid, refusal=refusal, message=message).SerializeToString(), [])


def _handle(msg: api_pb2.GenerateRequest) -> RequestHandle:
    req = _build(msg)
    return RequestHandle(req, "client-1", OutputText(TOKENIZER, []))


def test_submit_carries_the_constraint_and_grammar_invalid_is_raised():
    async def go():
        ec = _engine()
        handle = _handle(_msg(json_schema='{"type": "strin"}'))
        task = asyncio.ensure_future(ec.submit(handle))
        await asyncio.sleep(0)
        kind, header = ec.front.sent[-1]
        sub = cpb.Submit.FromString(header)
        assert kind == cl.KIND_SUBMIT and (sub.constraint_kind, sub.constraint_spec) == ("json_schema",
                                                                                         '{"type":"strin"}')
        _admitted(ec, sub.uid, cpb.GRAMMAR_INVALID, 'Unsupported type "strin"')
        with pytest.raises(GrammarInvalid, match='Unsupported type "strin"'):
            await task
        assert ec.handles == {} and ec._admits == {}

        free = _handle(_msg())
        task = asyncio.ensure_future(ec.submit(free))
        await asyncio.sleep(0)
        sub = cpb.Submit.FromString(ec.front.sent[-1][1])
        assert sub.constraint_kind == "" and sub.constraint_spec == ""
        _admitted(ec, sub.uid, cpb.ACCEPTED)
        await task
        assert ec.handles == {sub.uid: free}
    asyncio.run(go())


def test_a_caller_cancelled_while_the_core_compiles_aborts_its_request():
    async def go():
        ec = _engine()
        task = asyncio.ensure_future(ec.submit(_handle(_msg(regex="a+"))))
        await asyncio.sleep(0)
        uid = cpb.Submit.FromString(ec.front.sent[-1][1]).uid
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        kind, header = ec.front.sent[-1]
        assert kind == cl.KIND_ABORT and list(cpb.Abort.FromString(header).uids) == [uid]
        assert ec.handles == {} and ec._admits == {}
        _admitted(ec, uid, cpb.ACCEPTED)  # the core's late answer is dropped
        assert ec.handles == {}
    asyncio.run(go())


class _FakeEngine:
    """What frontend.admit_samples uses of an EngineClient; every submit answers `answer`."""

    def __init__(self, answer: Exception | None) -> None:
        self.metrics, self.answer, self.submitted, self.aborted = Metrics(), answer, [], []

    def tokenizer(self):
        return TOKENIZER

    def hello(self):
        return _hello()

    async def submit(self, handle):
        self.submitted.append(handle)
        if self.answer is not None:
            raise self.answer

    def abort(self, handle):
        self.aborted.append(handle)


@pytest.mark.parametrize("fields, field", [
    ({"json_schema": '{"type": "strin"}'}, "json_schema"),
    ({"regex": "(a"}, "regex"),
    ({"choice": api_pb2.ChoiceList(choices=["a"])}, "choice"),
    ({"grammar": api_pb2.Grammar(text="root ::= undefined_rule")}, "grammar"),
    ({"json_object": True}, "json_object"),
])
def test_grammar_invalid_is_invalid_argument_naming_the_constraint(fields, field):
    engine = _FakeEngine(GrammarInvalid("the compiler's message"))
    with pytest.raises(frontend.Refusal) as info:
        asyncio.run(frontend.admit_samples(engine, LIMITS, _msg(**fields), "c"))  # type: ignore[arg-type]
    r = info.value
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and r.field == field
    assert "the compiler's message" in r.description and r.message.startswith(f"{field}: ")
    assert engine.metrics.failure["INVALID_ARGUMENT"] == 1


def test_grammar_invalid_for_a_later_sample_aborts_the_earlier_ones():
    class Second(_FakeEngine):
        async def submit(self, handle):
            self.submitted.append(handle)
            if len(self.submitted) == 2:
                raise GrammarInvalid("no")

    engine = Second(None)
    with pytest.raises(frontend.Refusal):
        asyncio.run(frontend.admit_samples(engine, LIMITS, _msg(regex="a", n=3), "c"))  # type: ignore[arg-type]
    assert engine.aborted == engine.submitted[:1]


def test_unavailable_is_still_unavailable():
    engine = _FakeEngine(Unavailable("no worker connected"))
    with pytest.raises(frontend.Refusal) as info:
        asyncio.run(frontend.admit_samples(engine, LIMITS, _msg(regex="a"), "c"))  # type: ignore[arg-type]
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


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
