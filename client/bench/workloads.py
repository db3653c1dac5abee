"""What a load test sends: the workloads of `tandem bench`.

Owns turning flags into a list of `BenchRequest`s:
- `random`: prompts of random token ids (no tokenizer needed), input and output lengths drawn
  uniformly within `range_ratio` of the asked length (vLLM's `--random-range-ratio`), every prompt
  starting with the same `prefix_len` random tokens when asked (to exercise shared prefixes);
- `chat`: a synthetic chat-like mix: log-normal input and output lengths (median 256 and 192
  tokens, long right tails, clipped), random token ids;
- `jsonl`: a file of one JSON object per line with `prompt` (text) or `messages` (chat), and
  optionally `output_len` / `max_tokens`; output length otherwise `--random-output-len`;
- `multi-turn`: conversations of random token ids, each turn's prompt the conversation so far: the
  first turn is the shared `prefix_len` tokens plus `first_len` of its own, each later turn appends
  the previous turn's answer (the token ids the server returned, known only at run time: the runner
  builds those prompts) and `user_len` new user tokens.
A seed fixes every draw. Token ids are drawn from [3, vocab_size): the low ids are usually special.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIRST_ID = 3


@dataclass
class BenchRequest:
    index: int
    prompt: dict[str, Any]  # keyword arguments of AsyncTandemClient.generate_stream: token_ids | prompt | messages
    prompt_tokens: int  # known for token-id prompts; 0 until the server's usage says, otherwise
    max_new_tokens: int
    # Multi-turn: the conversation (0-based) and turn (1-based) of this request. For a turn after the
    # first, `prompt["token_ids"]` holds only the new user tokens: the runner sends the conversation so
    # far (the previous turn's prompt and the answer it got) followed by them.
    conversation: int | None = None
    turn: int | None = None


def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    lo = max(1, math.floor(mean * (1 - range_ratio)))
    hi = max(lo, math.ceil(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int, range_ratio: float = 0.0,
                    prefix_len: int = 0, seed: int = 0) -> list[BenchRequest]:
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if not 0 <= range_ratio < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    rng = random.Random(seed)
    prefix = [rng.randrange(FIRST_ID, vocab_size) for _ in range(prefix_len)]
    out = []
    for i in range(num):
        ids = prefix + [rng.randrange(FIRST_ID, vocab_size) for _ in range(_length(rng, input_len, range_ratio))]
        out.append(BenchRequest(i, {"token_ids": ids}, len(ids), _length(rng, output_len, range_ratio)))
    return out


def chat_like_requests(num: int, vocab_size: int, seed: int = 0, max_input: int = 4096,
                       max_output: int = 2048) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        n_in = min(max_input, max(4, round(rng.lognormvariate(math.log(256), 0.9))))
        n_out = min(max_output, max(4, round(rng.lognormvariate(math.log(192), 0.8))))
        ids = [rng.randrange(FIRST_ID, vocab_size) for _ in range(n_in)]
        out.append(BenchRequest(i, {"token_ids": ids}, n_in, n_out))
    return out


def jsonl_requests(path: str | Path, num: int, default_output_len: int, seed: int = 0) -> list[BenchRequest]:
    """The first `num` lines (all when num <= 0), in file order; a line's error names its number."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if 0 < num <= len(out):
                break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
                raise ValueError(f"{path}:{lineno}: want an object with exactly one of 'prompt' or 'messages'")
            n_out = int(obj.get("output_len", obj.get("max_tokens", default_output_len)))
            prompt = {"prompt": str(obj["prompt"])} if "prompt" in obj else {"messages": list(obj["messages"])}
            out.append(BenchRequest(len(out), prompt, 0, n_out))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def multi_turn_requests(num_conversations: int, turns: int, first_len: int, user_len: int, output_len: int,
                        vocab_size: int, range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0,
                        num_warmups: int = 0) -> list[BenchRequest]:
    """`num_warmups` single requests shaped like a first turn (not part of any conversation), then
    `num_conversations` x `turns` requests, conversation by conversation, turn by turn; indices run on
    across both. Every first turn (warm-ups too) starts with the same `prefix_len` random tokens."""
    if first_len < 1 or user_len < 1 or output_len < 1 or turns < 1:
        raise ValueError("--random-input-len, --multi-turn-user-len, --random-output-len and --multi-turn-turns "
                         "must be >= 1")
    if not 0 <= range_ratio < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    rng = random.Random(seed)
    prefix = [rng.randrange(FIRST_ID, vocab_size) for _ in range(prefix_len)]

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_ID, vocab_size) for _ in range(n)]

    out: list[BenchRequest] = []
    for _ in range(num_warmups):
        first = prefix + ids(_length(rng, first_len, range_ratio))
        out.append(BenchRequest(len(out), {"token_ids": first}, len(first), _length(rng, output_len, range_ratio)))
    for c in range(num_conversations):
        for t in range(1, turns + 1):
            new = prefix + ids(_length(rng, first_len, range_ratio)) if t == 1 else ids(_length(rng, user_len,
                                                                                                  range_ratio))
            # A later turn's length is known once the answers before it are: the runner fills it in.
            out.append(BenchRequest(len(out), {"token_ids": new}, len(new) if t == 1 else 0,
                                    _length(rng, output_len, range_ratio), conversation=c, turn=t))
    return out


def conversation_prompt(history: list[int], req: BenchRequest) -> list[int]:
    """What a multi-turn request sends: the conversation so far, then its new tokens."""
    return history + list(req.prompt["token_ids"])
