"""The oracle: transformers' own `model.generate` on the same weights, and the near-tie rule.

A float divergence between two batch shapes is accepted only where the reference itself could not
tell the top two tokens apart (logits within `NEAR_TIE`); from there on the sequences may differ.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

NEAR_TIE = 1e-4


@dataclass
class Reference:
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logit at each generated position


def hf_generate(model, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> Reference:
    """Greedy `model.generate`; without `stop_at_eos` EOS is an ordinary token (server: ignore_eos)."""
    config = copy.deepcopy(model.generation_config)
    if not stop_at_eos:
        config.eos_token_id = None
    config.pad_token_id = 0
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=max_new_tokens,
        do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    gaps = []
    for step_logits in out.logits:
        top2 = torch.topk(step_logits[0].float(), 2).values
        gaps.append(float(top2[0] - top2[1]))
    return Reference(tokens, gaps)


def assert_matches(got: list[int], ref: Reference, what: str) -> bool:
    """Asserts token equality up to the first near-tie; returns True when it matched all the way."""
    for i, (a, b) in enumerate(zip(got, ref.tokens, strict=False)):
        if a != b:
            assert ref.gaps[i] < NEAR_TIE, (
                f"{what}: token {i} is {a}, reference {b}, and the reference's top-2 gap is {ref.gaps[i]:.3g}"
            )
            return False
    assert len(got) == len(ref.tokens), f"{what}: {len(got)} tokens, reference {len(ref.tokens)}"
    return True
