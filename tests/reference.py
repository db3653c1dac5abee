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


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties as a transformers LogitsProcessor (transformers has
    none): logits -= frequency * count + presence * (count > 0), count over generated tokens only
    (those past the prompt's `prompt_len`). The same float32 expression as worker_svc/penalties.py."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores, dtype=torch.int32)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=torch.int32))
        c = counts.to(torch.float32)
        freq = torch.tensor(self.frequency, dtype=torch.float32)
        pres = torch.tensor(self.presence, dtype=torch.float32)
        return scores.to(torch.float32) - (c * freq + (c > 0).to(torch.float32) * pres)


def hf_generate(model, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = False,
                **generate_kwargs) -> Reference:
    """Greedy `model.generate`; without `stop_at_eos` EOS is an ordinary token (server: ignore_eos).
    `generate_kwargs` go to generate as they are (repetition_penalty=, sequence_bias=, logit processors)."""
    config = copy.deepcopy(model.generation_config)
    if not stop_at_eos:
        config.eos_token_id = None
    config.pad_token_id = 0
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=max_new_tokens,
        do_sample=False, output_logits=True, output_scores=True, return_dict_in_generate=True, **generate_kwargs,
    )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    gaps = []
    # With logits processors the greedy choice is made on their output (scores), so the near-tie is too.
    for step_logits in (out.scores if generate_kwargs else out.logits):
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
