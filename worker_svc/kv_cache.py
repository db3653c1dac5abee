"""The paged KV cache: per-layer K and V block pools, their sizing, and the KV-store op.

Layout per layer: `[num_blocks, block_size, kv_heads, head_dim]` for K and for V. A token's KV slot
is `block * block_size + offset`; the scheduler owns which blocks a request holds and sends the
slots in each StepPlan. One extra block past `num_blocks` is allocated but never announced: the
store op sends padding tokens (slot -1) there, which skips them without a host sync or a masked
read-modify-write that would race with real writes to the same slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("tandem.worker.kv_cache")

# On CUDA, the share of free memory (after weights) the cache takes when no budget is given; the
# rest stays for activations, logits and the sampler's [R, V] temporaries.
CUDA_FREE_FRACTION = 0.85
CPU_DEFAULT_GB = 1.0


@dataclass(frozen=True)
class KVCacheConfig:
    num_layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype
    device: str

    @property
    def bytes_per_block(self) -> int:
        return block_bytes(self.num_layers, self.kv_heads, self.head_dim, self.block_size, self.dtype)


def block_bytes(num_layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * kv_heads * head_dim * itemsize


def size_num_blocks(num_blocks: int, memory_gb: float, device: str, per_block: int) -> int:
    """Blocks to allocate: an explicit count wins, then a memory budget, then the device default."""
    if num_blocks > 0:
        return num_blocks
    if memory_gb > 0:
        budget = memory_gb * (1 << 30)
    elif device == "cpu":
        budget = CPU_DEFAULT_GB * (1 << 30)
    else:
        free, _total = torch.cuda.mem_get_info()
        budget = free * CUDA_FREE_FRACTION
    blocks = int(budget // per_block) - 1  # minus the hidden padding block
    if blocks < 1:
        raise ValueError(f"KV cache budget of {budget / (1 << 20):.1f} MiB holds no {per_block}-byte block")
    return blocks


def config_for_model(model_config, block_size: int, num_blocks: int, memory_gb: float, dtype: torch.dtype,
                     device: str) -> KVCacheConfig:
    """KV geometry from a transformers config; block count from the flags (see size_num_blocks)."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    layers = model_config.num_hidden_layers
    per_block = block_bytes(layers, kv_heads, head_dim, block_size, dtype)
    blocks = size_num_blocks(num_blocks, memory_gb, device, per_block)
    return KVCacheConfig(layers, kv_heads, head_dim, block_size, blocks, dtype, device)


class PagedKVCache:
    """K/V block pools for every layer. `k[layer]` / `v[layer]` are the announced blocks only."""

    def __init__(self, cfg: KVCacheConfig) -> None:
        self.cfg = cfg
        shape = (cfg.num_blocks + 1, cfg.block_size, cfg.kv_heads, cfg.head_dim)
        # Zeros, not empty: padded context positions are masked out of the softmax, but their V still
        # meets a zero weight, and 0 * NaN from uninitialised memory would poison the output.
        self._k = [torch.zeros(shape, dtype=cfg.dtype, device=cfg.device) for _ in range(cfg.num_layers)]
        self._v = [torch.zeros(shape, dtype=cfg.dtype, device=cfg.device) for _ in range(cfg.num_layers)]
        self.k = [t[: cfg.num_blocks] for t in self._k]
        self.v = [t[: cfg.num_blocks] for t in self._v]
        self.trash_slot = cfg.num_blocks * cfg.block_size  # first slot of the hidden block
        log.info(
            "KV cache: %d blocks x %d tokens, %d layers, %d KV heads x %d, %s on %s (%.1f MiB)",
            cfg.num_blocks, cfg.block_size, cfg.num_layers, cfg.kv_heads, cfg.head_dim, cfg.dtype,
            cfg.device, (cfg.num_blocks + 1) * cfg.bytes_per_block / (1 << 20),
        )

    @property
    def num_slots(self) -> int:
        return self.cfg.num_blocks * self.cfg.block_size

    def store(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Writes key/value `[T, kv_heads, head_dim]` at `slot_mapping[T]`; slot -1 writes nowhere."""
        assert key.shape == value.shape and key.shape[0] == slot_mapping.shape[0]
        slots = torch.where(slot_mapping >= 0, slot_mapping, self.trash_slot).to(torch.int64)
        kd, vd = self._k[layer].dtype, self._v[layer].dtype
        self._k[layer].view(-1, self.cfg.kv_heads, self.cfg.head_dim).index_copy_(0, slots, key.to(kd))
        self._v[layer].view(-1, self.cfg.kv_heads, self.cfg.head_dim).index_copy_(0, slots, value.to(vd))
