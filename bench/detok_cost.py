"""What detokenizing costs per token by how many tokens one push carries (the front end's
`OutputText.push`; scheduler_svc/frontend/handle.py batches a unary call's tokens because of it).

Random token ids of the embedded SmolLM2 tokenizer (converted once into the model cache, as
`make run` does), pushed 1, 4, 16, 64 or all at a time through a fresh OutputText without stop
strings; each text is checked against the full decode. CPU only.

    python -m bench.detok_cost [--tokens 1024] [--repeats 20] [--json docs/bench/detok_cost.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from bench.records import cpu_header, write_record
from scheduler_svc.frontend.detokenizer import OutputText
from scheduler_svc.frontend.tokenizer import TandemTokenizer


def embedded_tokenizer() -> TandemTokenizer:
    """The embedded SmolLM2's tokenizer, from the model cache (converted on first use, as `make run` does)."""
    from worker_svc.models import EMBEDDED_NAME, converted_gguf_dir, embedded_gguf_path

    return TandemTokenizer((converted_gguf_dir(embedded_gguf_path(), EMBEDDED_NAME) / "tokenizer.json").read_bytes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.detok_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default="docs/bench/detok_cost.json")
    args = p.parse_args(argv)
    tok = embedded_tokenizer()
    rng = random.Random(0)
    ids = [rng.randrange(3, tok.vocab_size) for _ in range(args.tokens)]
    full = tok.decode(ids)
    entries = []
    for chunk in (1, 4, 16, 64, args.tokens):
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = OutputText(tok)
            for i in range(0, len(ids), chunk):
                out.push(ids[i : i + chunk])
            out.finish()
            assert out.text == full, chunk
        us = (time.perf_counter() - t0) / args.repeats / len(ids) * 1e6
        entries.append({"tokens_per_push": chunk, "us_per_token": round(us, 3)})
        print(json.dumps(entries[-1]), flush=True)
    for e in entries:
        e["against_one_per_push"] = round(e["us_per_token"] / entries[0]["us_per_token"], 3)
    record = {**cpu_header("bench.detok_cost", argv), "tokens": args.tokens, "repeats": args.repeats,
              "entries": entries}
    write_record(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
