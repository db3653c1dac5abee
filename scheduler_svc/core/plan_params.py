"""The per-slot parameters a StepPlan carries for the requests it starts (engine.proto's `new_*`).

Owns how a request's sampling parameters, penalties, logit bias and min_tokens become the plan's
arrays: the scalars per new slot, and the flat lists (bias entries, the ids min_tokens masks, and a
penalized request's token history) with each slot's count. numpy only (the scheduler never imports
torch). Unpenalized requests send no history, so the common plan stays as small as before.

A constrained request (structured output) also names its compiled constraint (`new_grammar`, an index
into the plan's `grammar_keys`), lists its stop tokens in `mask_ids` whatever its min_tokens (the
worker's matcher ends the output only on those, and keeps them out while the output is short of
min_tokens: the device mask is not used for such a slot), and sends its history once it has
outputs, for the matcher to replay after a preemption or a worker loss.
"""

from __future__ import annotations

import numpy as np

from scheduler_svc.core.request import Request


def _flat(lists: list[list[int]] | list[list[float]], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    counts = np.fromiter((len(x) for x in lists), np.int32, len(lists))
    flat = np.fromiter((v for x in lists for v in x), dtype, int(counts.sum()))
    return counts, flat


def masked_until_min_tokens(req: Request) -> list[int]:
    """The ids min_tokens keeps from being sampled: its stop tokens, and EOS unless EOS is ignored. A
    constrained request's stop tokens, always (its matcher's; see the module docstring)."""
    if req.sampling.min_tokens <= 0 and req.constraint is None:
        return []
    ids = set(req.stop_token_ids) | (set() if req.ignore_eos else set(req.eos_token_ids))
    return sorted(ids)


def new_slot_arrays(reqs: list[Request]) -> dict[str, np.ndarray | list[str]]:
    """StepPlan keyword arrays (and `grammar_keys`) for the requests a plan starts, in its order of new
    slots.

    A request is admitted only with no sample in flight, so prompt + outputs is every token before
    this plan's own sample: the history a recreated slot rebuilds its counts from."""
    if not reqs:
        return {}  # a plan that starts nothing: StepPlan's defaults are these arrays, empty
    ps = [r.sampling for r in reqs]
    n = len(reqs)

    def col(values, dtype: str) -> np.ndarray:
        return np.fromiter(values, dtype, n)

    bias_count, bias_ids = _flat([list(p.logit_bias) for p in ps], "int32")
    _, bias_values = _flat([list(p.logit_bias.values()) for p in ps], "float32")
    mask_count, mask_ids = _flat([masked_until_min_tokens(r) for r in reqs], "int32")
    hist_len, history = _flat([r.prompt_ids + r.output_ids if r.sampling.penalized
                               or (r.constraint is not None and r.output_ids) else [] for r in reqs], "int32")
    keys: list[str] = []
    grammar = np.full(n, -1, np.int32)
    for i, r in enumerate(reqs):
        if r.constraint is not None:
            key = r.constraint.key
            if key not in keys:
                keys.append(key)
            grammar[i] = keys.index(key)
    return {
        "new_temperature": col((p.temperature for p in ps), "float32"),
        "new_top_p": col((p.top_p for p in ps), "float32"),
        "new_top_k": col((p.top_k for p in ps), "int32"),
        "new_min_p": col((p.min_p for p in ps), "float32"),
        "new_seed": col((p.seed for p in ps), "uint64"),
        "new_num_logprobs": col((p.num_logprobs for p in ps), "int32"),
        "new_repetition_penalty": col((p.repetition_penalty for p in ps), "float32"),
        "new_presence_penalty": col((p.presence_penalty for p in ps), "float32"),
        "new_frequency_penalty": col((p.frequency_penalty for p in ps), "float32"),
        "new_min_tokens": col((p.min_tokens for p in ps), "int32"),
        "new_prompt_len": col((r.num_prompt_tokens for r in reqs), "int32"),
        "new_bias_count": bias_count, "bias_ids": bias_ids, "bias_values": bias_values,
        "new_mask_count": mask_count, "mask_ids": mask_ids,
        "new_history_len": hist_len, "history": history,
        "new_grammar": grammar, "grammar_keys": keys,
    }
