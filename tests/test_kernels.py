"""The Triton kernels (paged decode with split-K, varlen paged prefill, KV store) against the
PyTorch reference path, which runs in float64 on the CPU.

Runs on CUDA; without a GPU it runs the same kernels in Triton's interpreter (TRITON_INTERPRET=1,
set here before the kernels are defined; triton comes with the dev extra on Linux x86-64), on
smaller contexts since the interpreter is slow, and float32 only (see _skip_interpreted_bf16).
Every case draws fresh random inputs (never zeros), fills the whole KV pool with random values (a
read of a wrong block shows), scatters each row's blocks over the pool, and poisons the output with
NaN first, so an element the kernel fails to write fails the comparison. The kernels get a
persistent-style block table: more rows than the step, step rows mapped to shuffled table rows, and
every cell outside a row's context holding a stale id (a valid block, or -1); the reference gets the
plain per-step table (row r in row r, -1 past its context), so it shares none of that indirection.
"""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

if torch.cuda.is_available():
    DEVICE, MAX_CONTEXT = "cuda", 16384
else:
    os.environ["TRITON_INTERPRET"] = "1"  # conftest sets it earlier for whole runs (see there)
    pytest.importorskip("triton")
    DEVICE, MAX_CONTEXT = "cpu", 300
    import triton.runtime.interpreter as _interpreter

    _patch_tensor = _interpreter._patch_lang_tensor

    def _index_fix(tensor, scope) -> None:
        """The interpreter holds scalars as 1-element arrays and turns them into loop bounds with
        int(array), which numpy 2 refuses for arrays of one dimension; read the element instead."""
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _index_fix

from worker_svc.attention import PagedStep, paged_attention  # noqa: E402
from worker_svc.kernels.triton_attention import paged_decode, paged_prefill, store_kv  # noqa: E402
from worker_svc.kv_cache import KVCacheConfig, PagedKVCache  # noqa: E402

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _seed(*case) -> int:
    """A seed per test case that is the same in every process (hash() of a str is salted per process),
    so that a failure reproduces."""
    return zlib.crc32(repr(case).encode()) & 0xFFFF


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """The 16K-token cases' memory goes back to the driver, for the server processes of later tests."""
    yield
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _skip_interpreted_bf16(dtype) -> None:
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton 3.6's interpreter computes bfloat16 dot products wrongly; bf16 runs on CUDA")


def _cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, gen: torch.Generator):
    cfg = KVCacheConfig(1, kv_heads, head_dim, block_size, num_blocks, dtype, DEVICE)
    cache = PagedKVCache(cfg)
    for t in (cache._k[0], cache._v[0]):
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    return cache


class Tables:
    """A step's blocks twice: `plain` [R, B] (row r in row r, -1 past its context) for the reference,
    and `persistent` [R + spare, B + spare] with `table_rows` [R] for the kernels."""

    def __init__(self, kv_lens: list[int], block_size: int, num_blocks: int, rng: random.Random,
                 padding: tuple[int, ...] = ()) -> None:
        """Each row's blocks drawn without replacement from a shuffled pool. Rows in `padding`
        (kv_len 0) map to table row 0, like a graph bucket's padding rows, whoever owns that row."""
        need = [-(-n // block_size) for n in kv_lens]
        pool = rng.sample(range(num_blocks), sum(need))
        width = max(1, max(need))
        self.plain = np.full((len(kv_lens), width), -1, dtype=np.int32)
        slots, wide = len(kv_lens) + rng.randint(2, 5), width + rng.randint(1, 3)
        # Stale: blocks of other requests (valid ids, random data) and -1, in every cell to begin with.
        self.persistent = np.array([[rng.randrange(-1, num_blocks) for _ in range(wide)] for _ in range(slots)],
                                   dtype=np.int32)
        self.table_rows = np.array(rng.sample(range(slots), len(kv_lens)), dtype=np.int32)
        self.table_rows[list(padding)] = 0
        at = 0
        for r, k in enumerate(need):
            self.plain[r, :k] = pool[at : at + k]
            if r not in padding:
                self.persistent[self.table_rows[r], :k] = pool[at : at + k]
            at += k


def _reference(query, cache: PagedKVCache, tables, query_start, kv_lens, scale) -> torch.Tensor:
    """The PyTorch path of attention.py, in float64 on the CPU."""
    cfg = cache.cfg
    ref_cache = PagedKVCache(KVCacheConfig(1, cfg.kv_heads, cfg.head_dim, cfg.block_size, cfg.num_blocks,
                                           torch.float64, "cpu"))
    ref_cache.k[0].copy_(cache.k[0].double().cpu())
    ref_cache.v[0].copy_(cache.v[0].double().cpu())
    slots = np.zeros(int(query_start[-1]), dtype=np.int32)  # unused by paged_attention itself
    step = PagedStep.from_arrays(ref_cache, slots, tables, np.asarray(query_start, np.int32),
                                 np.asarray(kv_lens, np.int32))
    return paged_attention(query.double().cpu(), ref_cache.k[0], ref_cache.v[0], step, scale)


def dev(a) -> torch.Tensor:
    """An int32 index array on the test device."""
    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.int32), device=DEVICE)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref).abs().max() / ref.abs().max())


def _context_lengths(rng: random.Random, rows: int) -> list[int]:
    """Ragged: 1, a page boundary, one long context, the rest random."""
    fixed = [1, 16, MAX_CONTEXT]
    return [fixed[i] if i < len(fixed) else rng.randint(1, MAX_CONTEXT // 4) for i in range(rows)]


DECODE_CASES = [
    # block_size, GQA ratio (query heads per KV head), head_dim, dtype, num_splits
    (16, 4, 128, torch.bfloat16, 1),
    (16, 8, 128, torch.bfloat16, 4),
    (32, 1, 64, torch.bfloat16, 2),
    (64, 4, 64, torch.bfloat16, 16),
    (16, 1, 128, torch.float32, 1),
    (32, 8, 64, torch.float32, 8),
    (64, 4, 128, torch.float32, 4),
]


@pytest.mark.parametrize("block_size,group,head_dim,dtype,splits", DECODE_CASES)
def test_paged_decode_matches_reference(block_size, group, head_dim, dtype, splits):
    _skip_interpreted_bf16(dtype)
    seed = _seed(block_size, group, head_dim, dtype, splits)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    kv_heads = 2
    rows = rng.randint(4, 7)
    kv_lens = _context_lengths(rng, rows) + [0]  # the last row is padding, as in a graph bucket
    num_blocks = sum(-(-n // block_size) for n in kv_lens) + 8
    cache = _cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    n = len(kv_lens)
    tables = Tables(kv_lens, block_size, num_blocks, rng, padding=(n - 1,))
    query = torch.randn(n, kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    # Rows in reverse token order: a row's query need not sit at its own index.
    rows_t = dev(np.arange(n)[::-1])
    toks_t = dev(np.arange(n))
    paged_decode(query, cache.k[0], cache.v[0], out, dev(tables.persistent), dev(tables.table_rows), dev(kv_lens),
                 rows_t, toks_t, scale, num_splits=splits)
    assert not out.isnan().any(), "an output element was not written"
    assert torch.all(out[0] == 0), "the padding row (row n - 1, token 0) must attend to nothing"
    # Token t holds row n - 1 - t's query: flipped, tokens are in row order (padding row last, left out).
    ref = _reference(query.flip(0)[: n - 1], cache, tables.plain[: n - 1], np.arange(n), kv_lens[: n - 1], scale)
    err = _rel_err(out.flip(0)[: n - 1], ref)
    assert err <= TOLERANCE[dtype], err


@pytest.mark.parametrize("merge_inline", [False, True])
def test_paged_decode_merge_forms_agree_and_repeat(merge_inline):
    """Both merges of split parts (the separate kernel, and the last part merging in place: the
    launch option `merge_inline`) match the float64 reference, launch after launch on one buffer of
    counters (each launch must leave them zero for the next)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    seed = _seed("merge", merge_inline)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    kv_heads, group, head_dim, block_size, splits = 2, 4, 64, 16, 4
    kv_lens = _context_lengths(rng, 5)
    num_blocks = sum(-(-n // block_size) for n in kv_lens) + 8
    cache = _cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    tables = Tables(kv_lens, block_size, num_blocks, rng)
    n, scale = len(kv_lens), head_dim**-0.5
    for launch in range(3):
        query = torch.randn(n, kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
        out = torch.full_like(query, float("nan"))
        paged_decode(query, cache.k[0], cache.v[0], out, dev(tables.persistent), dev(tables.table_rows),
                     dev(kv_lens), dev(np.arange(n)), dev(np.arange(n)), scale, num_splits=splits,
                     launch={"merge_inline": merge_inline})
        assert not out.isnan().any(), f"launch {launch}: an output element was not written"
        ref = _reference(query, cache, tables.plain, np.arange(n + 1), kv_lens, scale)
        err = _rel_err(out, ref)
        assert err <= TOLERANCE[dtype], (launch, err)


PREFILL_CASES = [
    (16, 4, 128, torch.bfloat16),
    (32, 8, 64, torch.bfloat16),
    (64, 1, 128, torch.bfloat16),
    (16, 4, 64, torch.float32),
    (32, 1, 128, torch.float32),
    (64, 8, 64, torch.float32),
]


@pytest.mark.parametrize("block_size,group,head_dim,dtype", PREFILL_CASES)
def test_paged_prefill_matches_reference(block_size, group, head_dim, dtype):
    """Ragged chunks: whole prompts (nothing cached before), later chunks of long contexts, and
    single-token rows mixed in (left to the decode kernel: prefill must not write them)."""
    _skip_interpreted_bf16(dtype)
    seed = _seed(block_size, group, head_dim, dtype, "prefill")
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    kv_heads = 2
    limit = min(MAX_CONTEXT, 2048)
    q_lens = [rng.randint(2, limit // 4), 1, rng.randint(33, limit // 2), 1, 2, rng.randint(2, 70)]
    cached = [0, rng.randint(0, limit // 2), rng.randint(1, limit // 2), 7, 0, MAX_CONTEXT - 70]
    kv_lens = [q + c for q, c in zip(q_lens, cached, strict=True)]
    num_blocks = sum(-(-n // block_size) for n in kv_lens) + 8
    cache = _cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    tables = Tables(kv_lens, block_size, num_blocks, rng)
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    query = torch.randn(int(query_start[-1]), kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    multi = np.array([r for r, q in enumerate(q_lens) if q > 1], dtype=np.int32)
    paged_prefill(query, cache.k[0], cache.v[0], out, dev(tables.persistent), dev(tables.table_rows), dev(kv_lens),
                  dev(query_start), dev(multi), max(q_lens), scale)
    singles = [int(query_start[r]) for r, q in enumerate(q_lens) if q == 1]
    assert out[singles].isnan().all(), "prefill wrote a single-token row"
    written = [t for t in range(out.shape[0]) if t not in singles]
    assert not out[written].isnan().any(), "an output element was not written"
    ref = _reference(query, cache, tables.plain, query_start, kv_lens, scale)
    err = _rel_err(out[written], ref[written])
    assert err <= TOLERANCE[dtype], err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_writes_slots_and_skips_padding(dtype):
    gen = torch.Generator().manual_seed(7)
    kv_heads, head_dim, block_size, num_blocks = 3, 64, 16, 12  # 3 heads: not a power of two
    cache = _cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen)
    before_k, before_v = cache._k[0].clone(), cache._v[0].clone()
    slots = [5, -1, 17, 190, -1, 0]
    key = torch.randn(len(slots), kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    # Value as a non-contiguous view, as the attention forward passes it (a transpose of [KVH, T, D]).
    value = torch.randn(kv_heads, len(slots), head_dim, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)
    store_kv(key, value, cache.k[0], cache.v[0], torch.tensor(slots, dtype=torch.int32, device=DEVICE))
    flat_k = cache._k[0].view(-1, kv_heads, head_dim)
    flat_v = cache._v[0].view(-1, kv_heads, head_dim)
    expect_k = before_k.view(-1, kv_heads, head_dim).clone()
    expect_v = before_v.view(-1, kv_heads, head_dim).clone()
    for t, s in enumerate(slots):
        if s >= 0:
            expect_k[s], expect_v[s] = key[t], value[t]
    assert torch.equal(flat_k, expect_k) and torch.equal(flat_v, expect_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sort_filters", [False, True])
def test_fused_sampler_matches_pytorch_path(dtype, sort_filters):
    """Same tokens, logprobs, log-sum-exp and top-n as sampler.py's PyTorch path (the kernel uses the
    same noise), over a vocabulary spanning several kernel chunks, greedy and random rows mixed,
    broken rows (NaN, +inf, all -inf) and a masked one included."""
    from worker_svc.sampler import sample

    gen = torch.Generator().manual_seed(11 + sort_filters)
    rows, vocab = 24, 5000
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    logits[0, 77] = float("nan")
    logits[1, 4999] = float("inf")
    logits[2] = float("-inf")
    logits[3, :4096] = float("-inf")  # its live tokens all sit in the last chunk
    temperature = torch.rand(rows, generator=gen) * 1.5
    temperature[::3] = 0.0
    params = [temperature, 0.3 + 0.7 * torch.rand(rows, generator=gen),
              torch.randint(0, 60, (rows,), generator=gen, dtype=torch.int32), torch.rand(rows, generator=gen) * 0.2,
              torch.randint(-(2**63), 2**63 - 1, (rows,), generator=gen),
              torch.randint(0, 9000, (rows,), generator=gen)]
    ref = sample(logits, *params, 4, sort_filters=sort_filters, fused=False)
    got = sample(logits.to(DEVICE), *(p.to(DEVICE) for p in params), 4, sort_filters=sort_filters, fused=True)
    token = got.token_ids.cpu()
    assert ((token >= 0) & (token < vocab)).all()
    assert got.logprob[:3].isnan().all() and got.lse[:3].isnan().all()
    assert token[3] >= 4096
    live = slice(3, rows)
    assert torch.equal(token[live], ref.token_ids[live])
    torch.testing.assert_close(got.logprob.cpu()[live], ref.logprob[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.lse.cpu()[live], torch.logsumexp(logits.float(), -1)[live], rtol=1e-5, atol=1e-5)
    # Top-n: the same values (a tie in bf16 may list equal logits in another order).
    values = logits.float()[live]
    top_ids = got.top_ids.cpu()[live].long()
    torch.testing.assert_close(values.gather(1, top_ids), values.gather(1, ref.top_ids[live].long()))
    torch.testing.assert_close(got.top_logprobs.cpu()[live], ref.top_logprobs[live], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flags", ["all", "repetition", "counts"])
def test_fused_penalties_match_pytorch_path(dtype, flags):
    """PenaltyState.apply through the Triton kernel gives the PyTorch path's logits bit for bit: rows
    mapped to shuffled slots (one slot twice, the neutral trash row for padding), random penalties
    and counts, a vocabulary that is not a multiple of the kernel's block; neutral rows keep their
    logits exactly; -inf entries (masked tokens) stay -inf."""
    from worker_svc.penalties import ALL, PenaltyFlags, PenaltyState

    gen = torch.Generator().manual_seed(_seed("penalties", str(dtype), flags))
    slots_n, vocab, rows = 12, 3000 if DEVICE == "cpu" else 128_256, 10
    st = PenaltyState(slots_n, vocab, DEVICE)
    st.allocate()
    st.d_rep.copy_(0.5 + 1.5 * torch.rand(slots_n + 1, generator=gen))
    st.d_rep[7] = 1.0  # a row with counts penalties but no repetition penalty
    st.d_freq.copy_(torch.randn(slots_n + 1, generator=gen))
    st.d_pres.copy_(torch.randn(slots_n + 1, generator=gen))
    counts = torch.randint(0, 6, (slots_n + 1, vocab), generator=gen, dtype=torch.int32)
    counts *= torch.rand(slots_n + 1, vocab, generator=gen) < 0.1  # most tokens never generated
    st.counts.copy_(counts)
    st.seen.copy_((counts > 0) | (torch.rand(slots_n + 1, vocab, generator=gen) < 0.05))
    neutral = 3
    st.d_rep[neutral], st.d_freq[neutral], st.d_pres[neutral] = 1.0, 0.0, 0.0
    for s in (st.trash,):
        st.d_rep[s], st.d_freq[s], st.d_pres[s] = 1.0, 0.0, 0.0
        st.counts[s], st.seen[s] = 0, False
    slots = torch.tensor([5, neutral, 0, 11, 5, 7, st.trash, 2, 9, 1], dtype=torch.int64, device=DEVICE)
    assert len(slots) == rows
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    logits[0, :50] = float("-inf")
    logits = logits.to(DEVICE)
    counter = torch.full((rows,), 100, dtype=torch.int64, device=DEVICE)
    pf = {"all": ALL, "repetition": PenaltyFlags(repetition=True),
          "counts": PenaltyFlags(counts=True)}[flags]
    ref = st.apply(logits, slots, counter, pf, fused=False)
    got = st.apply(logits, slots, counter, pf, fused=True)
    assert got.dtype == torch.float32 and not got.isnan().any()
    assert torch.equal(got, ref)
    for r in (1, 6):  # the neutral slot and the trash row: untouched
        assert torch.equal(got[r], logits[r].float())
    assert torch.isinf(got[0, :50]).all() and (got[0, :50] < 0).all()
    assert not torch.equal(got[0], logits[0].float())  # the test's penalties do change a live row
