"""The engine link's structured-output messages (COMPILE, COMPILED, RELEASE) round-trip, and garbage is
a WireError, not a crash."""

from __future__ import annotations

import pytest
from tandem import wire


def test_compile_compiled_release_round_trip():
    specs = [("k1", "json_schema", '{"type": "object"}'), ("k2", "choice", '["a", "b"]')]
    kind, header, frames = wire.split(wire.compile_message(specs))
    assert kind == wire.KIND_COMPILE and frames == [] and wire.decode_compile(header) == specs
    kind, header, _ = wire.split(wire.compiled_message("k1", False, "Unsupported type", 12.5))
    assert kind == wire.KIND_COMPILED and wire.decode_compiled(header) == ("k1", False, "Unsupported type", 12.5)
    kind, header, _ = wire.split(wire.release_message(["k1", "k2"]))
    assert kind == wire.KIND_RELEASE and wire.decode_release(header) == ["k1", "k2"]


@pytest.mark.parametrize("decode", [wire.decode_compile, wire.decode_compiled, wire.decode_release])
def test_garbage_is_a_wire_error(decode):
    with pytest.raises(wire.WireError):
        decode(b"\xff\xff\xff")


def test_hello_carries_the_grammar_engine():
    hello = wire.Hello(worker_id="w", pid=1, model_name="m", vocab_size=8, eos_token_ids=[2], max_context=16,
                       dtype="float32", device="cpu", num_blocks=4, block_size=4, max_num_tokens=8, max_num_rows=2,
                       max_blocks_per_row=4, tokenizer_json=b"", grammar_engine="xgrammar 0.2.9")
    assert wire.Hello.from_header(hello.encode()[1]).grammar_engine == "xgrammar 0.2.9"
