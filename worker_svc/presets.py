"""Model shapes for `--model random:<preset>`: real architectures with random weights.

This module owns the preset table (plain config dicts, no weights) and the seeded weight init that
makes a random model reproducible: every parameter is drawn from its own generator keyed by
(seed, parameter name), so two processes building the same spec on the same device type get
bit-identical weights whatever order they touch parameters in. Weights cannot be downloaded on the
benchmark machines; these shapes let the GPU path be measured at real sizes.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

# Per-element std of the logits of an untied LM head (hidden states are RMS-normalised, so this is
# std * sqrt(hidden)). A few units keeps the argmax well clear of the runner-up: the paged and dense
# attention paths differ by float rounding only, and a near-tie would make greedy comparisons flaky.
LOGIT_STD = 4.0

_LLAMA3_ROPE_8B = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}
_LLAMA3_ROPE_1B = {**_LLAMA3_ROPE_8B, "factor": 32.0}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_parameters": _LLAMA3_ROPE_8B,
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_parameters": _LLAMA3_ROPE_1B,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    # For tests: a few layers, GQA 2:1, the SmolLM2 vocabulary so the embedded tokenizer fits, an
    # untied head so that attention (not just the input embedding) decides the next token.
    "tiny-llama": {
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 49152,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
    },
    # For tests: Qwen2's shape in small (biased q/k/v projections, which a tensor-parallel split slices
    # with their weights), GQA 2:1, an untied head (tied, random weights mostly repeat the last token).
    "tiny-qwen2": {
        "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
}


def preset_config(name: str) -> dict[str, Any]:
    """A copy of a preset's config dict; KeyError names the known presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown random preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}


def _param_seed(seed: int, name: str) -> int:
    # crc32 is stable across processes and Python versions (str hash() is salted per process).
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Fills every parameter in place, deterministically from (seed, parameter name).

    Scales keep activations O(1) through the depth: embeddings N(0, 1), linear weights
    N(0, 1/fan_in), norms 1, biases 0, and an untied LM head scaled to LOGIT_STD.
    """
    out_emb = model.get_output_embeddings()
    head = out_emb.weight if out_emb is not None else None
    in_emb = model.get_input_embeddings().weight
    for name, param in model.named_parameters():  # tied parameters are listed once
        gen = torch.Generator(device=param.device)
        gen.manual_seed(_param_seed(seed, name))
        if param.ndim == 1:
            param.fill_(1.0 if "norm" in name else 0.0)
        elif param is in_emb:
            param.normal_(0.0, 1.0, generator=gen)
        elif param is head:
            param.normal_(0.0, LOGIT_STD / math.sqrt(param.shape[1]), generator=gen)
        else:
            assert param.ndim == 2, f"{name}: unexpected parameter shape {tuple(param.shape)}"
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=gen)
