"""The per-slot parameters a StepPlan carries for the requests it starts (engine.proto's `new_*`).

Owns how a request's sampling parameters, penalties, logit bias and min_tokens become the plan's
arrays: the scalars per new slot, and the flat lists (bias entries, the ids min_tokens masks, and a
penalized request's token history) with each slot's count. numpy only (the scheduler never imports
torch). Unpenalized requests send no history, so the common plan stays as small as before.
"""

from __future__ import annotations

import numpy as np

from scheduler_svc.request import Request


def _flat(lists: list[list[int]] | list[list[float]], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    counts = np.fromiter((len(x) for x in lists), np.int32, len(lists))
    flat = np.fromiter((v for x in lists for v in x), dtype, int(counts.sum()))
    return counts, flat


def masked_until_min_tokens(req: Request) -> list[int]:
    """The ids min_tokens keeps from being sampled: its stop tokens, and EOS unless EOS is ignored."""
    if req.sampling.min_tokens <= 0:
        return []
    ids = set(req.stop_token_ids) | (set() if req.ignore_eos else set(req.eos_token_ids))
    return sorted(ids)


def new_slot_arrays(reqs: list[Request]) -> dict[str, np.ndarray]:
    """StepPlan keyword arrays for the requests a plan starts, in its order of new slots.

    A request is admitted only with no sample in flight, so prompt + outputs is every token before
    this plan's own sample: the history a recreated slot rebuilds its counts from."""
    ps = [r.sampling for r in reqs]
    n = len(reqs)

    def col(values, dtype: str) -> np.ndarray:
        return np.fromiter(values, dtype, n)

    bias_count, bias_ids = _flat([list(p.logit_bias) for p in ps], "int32")
    _, bias_values = _flat([list(p.logit_bias.values()) for p in ps], "float32")
    mask_count, mask_ids = _flat([masked_until_min_tokens(r) for r in reqs], "int32")
    hist_len, history = _flat([r.prompt_ids + r.output_ids if r.sampling.penalized else [] for r in reqs], "int32")
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
    }
