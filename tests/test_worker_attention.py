"""Paged attention (reference path) against dense causal attention, element by element.

Each scenario is a ragged batch: rows with a cached prefix written by an earlier step through the
same entry point (chunked prefill, decode history) and rows starting fresh, blocks scattered over
the pool in random order. Block tables come two ways: per step (row r in row r, padded with -1) and
persistent (one table kept across both steps, more rows than the step, rows shuffled, every cell
past a row's context stale: another block's id or -1, over a pool that starts out random).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from worker_svc.attention import ATTN_IMPLEMENTATION, PagedStep, install, paged_attention_forward
from worker_svc.kv_cache import KVCacheConfig, PagedKVCache

HEAD_DIM = 16
NUM_BLOCKS = 96
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, H, D] at the last n positions of k/v [L, KVH, D]; float64, GQA by repeating KV heads."""
    n, heads, _ = q.shape
    length, kv_heads, _ = k.shape
    k = k.double().repeat_interleave(heads // kv_heads, dim=1)
    v = v.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    qpos = torch.arange(length - n, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > qpos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


class Batch:
    """Per-row full K/V/Q sequences, the blocks each row owns and, when `persistent`, the table."""

    def __init__(self, totals: list[int], heads: int, kv_heads: int, block_size: int, gen: torch.Generator,
                 persistent: bool = False):
        self.totals = totals
        self.block_size = block_size
        self.q = [torch.randn(t, heads, HEAD_DIM, generator=gen) for t in totals]
        self.k = [torch.randn(t, kv_heads, HEAD_DIM, generator=gen) for t in totals]
        self.v = [torch.randn(t, kv_heads, HEAD_DIM, generator=gen) for t in totals]
        perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.blocks: list[list[int]] = []
        for t in totals:
            need = -(-t // block_size)
            self.blocks.append(perm[:need])
            perm = perm[need:]
        self.table: np.ndarray | None = None
        self.table_rows: np.ndarray | None = None
        if persistent:
            slots, width = len(totals) + 5, max(len(b) for b in self.blocks) + 3
            self.table = torch.randint(-1, NUM_BLOCKS, (slots, width), generator=gen, dtype=torch.int32).numpy()
            self.table_rows = torch.randperm(slots, generator=gen)[: len(totals)].numpy().astype(np.int32)

    def step(self, cache: PagedKVCache, spans: list[tuple[int, int]]):
        """Packs positions [a, b) of every row into one step; returns (PagedStep, q, k, v) packed."""
        qs, ks, vs, slots, starts, kv_lens = [], [], [], [], [0], []
        for r, (a, b) in enumerate(spans):
            qs.append(self.q[r][a:b])
            ks.append(self.k[r][a:b])
            vs.append(self.v[r][a:b])
            pos = np.arange(a, b)
            blocks = np.array(self.blocks[r])
            slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            starts.append(starts[-1] + b - a)
            kv_lens.append(b)
        if self.table is None:
            width = max(len(b) for b in self.blocks) + 1  # one spare -1 column, like a padded plan
            tables = np.full((len(spans), width), -1, dtype=np.int32)
            for r, blocks in enumerate(self.blocks):
                tables[r, : len(blocks)] = blocks
        else:
            # Only the columns this step's context covers are written: the rest keep stale ids.
            tables = self.table
            for r, b in enumerate(kv_lens):
                need = -(-b // self.block_size)
                tables[self.table_rows[r], :need] = self.blocks[r][:need]
        step = PagedStep.from_arrays(cache, np.concatenate(slots), tables, np.array(starts), np.array(kv_lens),
                                     self.table_rows)
        dev = cache.cfg.device
        return step, torch.cat(qs).to(dev), torch.cat(ks).to(dev), torch.cat(vs).to(dev)


def run_layer(step: PagedStep, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Calls the interface function the way a transformers attention layer does."""
    layer = SimpleNamespace(layer_idx=0)
    out, _ = paged_attention_forward(
        layer, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
        scaling=scale, tandem_step=step,
    )
    return out[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("persistent", [False, True], ids=["per_step_table", "persistent_table"])
def test_ragged_batch_matches_dense_causal(block_size: int, heads: int, kv_heads: int, device: str,
                                           persistent: bool) -> None:
    gen = torch.Generator().manual_seed(block_size * 100 + heads)
    cache = PagedKVCache(KVCacheConfig(1, kv_heads, HEAD_DIM, block_size, NUM_BLOCKS, torch.float32, device))
    for pool in (cache.k[0], cache.v[0]):  # a stale block read unmasked then changes the result
        pool.copy_(torch.randn(pool.shape, generator=gen))
    # (cached prefix, new tokens): fresh prompts of 1, 7 and 45 tokens, decode rows after short and
    # block-crossing histories, prefill chunks continuing a cached prefix (aligned and not).
    rows = [(0, 7), (12, 1), (0, 45), (31, 1), (20, 37), (0, 1), (64, 1), (32, 16), (5, 40)]
    batch = Batch([c + n for c, n in rows], heads, kv_heads, block_size, gen, persistent)
    scale = HEAD_DIM**-0.5

    # Step 1 writes every cached prefix (rows without one get a single token, like a decode row of a
    # different request); step 2 is the ragged batch under test.
    first = [(0, c) if c else (0, 1) for c, _ in rows]
    step1, q1, k1, v1 = batch.step(cache, first)
    out1 = run_layer(step1, q1, k1, v1, scale)
    second = [(c, c + n) if c else (0, n) for c, n in rows]
    step2, q2, k2, v2 = batch.step(cache, second)
    out2 = run_layer(step2, q2, k2, v2, scale)
    # The single-token gather spans the longest single-token row's context, never the table width.
    longest = max(b for (a, b) in second if b - a == 1)
    assert step2.layout.single_blocks == -(-longest // block_size) < step2.block_tables.shape[1]

    for out, spans in ((out1, first), (out2, second)):
        at = 0
        for r, (a, b) in enumerate(spans):
            want = dense_causal(batch.q[r][a:b], batch.k[r][:b], batch.v[r][:b], scale)
            got = out[at : at + b - a].cpu()
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5, msg=f"row {r} span {a}:{b}")
            at += b - a
        assert at == out.shape[0]


def test_store_skips_padding_slots() -> None:
    cache = PagedKVCache(KVCacheConfig(2, 2, HEAD_DIM, 16, 8, torch.float32, "cpu"))
    key = torch.randn(4, 2, HEAD_DIM)
    value = torch.randn(4, 2, HEAD_DIM)
    cache.store(1, torch.tensor([-1, 17, -1, 3], dtype=torch.int32), key, value)
    flat_k = cache.k[1].reshape(-1, 2, HEAD_DIM)
    flat_v = cache.v[1].reshape(-1, 2, HEAD_DIM)
    assert torch.equal(flat_k[17], key[1]) and torch.equal(flat_k[3], key[3])
    assert torch.equal(flat_v[17], value[1]) and torch.equal(flat_v[3], value[3])
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool)
    written[[17, 3]] = True
    assert not flat_k[~written].any() and not flat_v[~written].any(), "a -1 slot wrote into the cache"
    assert not cache.k[0].any(), "another layer was written"


def test_model_forward_builds_no_dense_mask() -> None:
    """Through a real transformers model: our function is called and no mask reaches it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        want = model(input_ids=ids).logits[0]
    install(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    cache = PagedKVCache(KVCacheConfig(2, 2, 16, 16, 4, torch.float32, "cpu"))
    step = PagedStep.from_arrays(cache, np.arange(11) + 16, np.array([[1, -1]]), np.array([0, 11]),
                                 np.array([11]))
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=torch.arange(11)[None], use_cache=False,
                    tandem_step=step).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.k[1][1, :11].any() and not cache.k[1][0].any(), "K/V not stored in block 1"
