"""Tests for worker_svc.sampler: greedy, seeded sampling independent of batch-mates, filter semantics
checked statistically, logprob outputs, and the no-host-sync contract.

The sampler is deterministic, so the statistical tests always see the same draws: a fixed
significance threshold cannot flake, and each goodness-of-fit test is paired with a check that the
same statistic rejects a wrong distribution (so the test has power, not just a loose threshold).

Every test that goes through `_run` runs once on the PyTorch path and, where CUDA is available,
once more on the fused Triton kernel (CPU machines check the kernel against this path in
tests/test_kernels.py, interpreted).
"""

from __future__ import annotations

import pytest
import torch

from worker_svc.sampler import SampleOutput, sample

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_IMPL = {"device": "cpu"}


@pytest.fixture(autouse=True, params=["torch"] + (["cuda-kernel"] if torch.cuda.is_available() else []))
def impl(request):
    """Where `_run` samples: the PyTorch path on the CPU, or the fused kernel on CUDA."""
    _IMPL["device"] = "cuda" if request.param == "cuda-kernel" else "cpu"
    yield request.param
    _IMPL["device"] = "cpu"


def _run(
    logits: torch.Tensor,
    *,
    temperature: float | list[float] = 1.0,
    top_p: float | list[float] = 1.0,
    top_k: int | list[int] = 0,
    min_p: float | list[float] = 0.0,
    seed: int | list[int] = 0,
    counter: int | list[int] | torch.Tensor = 0,
    num_top: int = 0,
) -> SampleOutput:
    """Call sample() with per-row values given as scalars (broadcast) or lists."""
    rows = logits.shape[0]

    def col(value, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        if isinstance(value, list):
            return torch.tensor(value, dtype=dtype)
        return torch.full((rows,), value, dtype=dtype)

    dev = _IMPL["device"]
    out = sample(
        logits.to(dev),
        col(temperature, torch.float32).to(dev),
        col(top_p, torch.float32).to(dev),
        col(top_k, torch.int32).to(dev),
        col(min_p, torch.float32).to(dev),
        col(seed, torch.int64).to(dev),
        col(counter, torch.int64).to(dev),
        num_top,
    )
    return SampleOutput(*(t.cpu() for t in (out.token_ids, out.logprob, out.top_ids, out.top_logprobs, out.lse)))


def _chi2_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value over the cells with non-zero expected mass."""
    counts = counts.to(torch.float64)
    expected = expected_probs.to(torch.float64) * counts.sum()
    cells = expected > 0
    stat = (((counts - expected) ** 2)[cells] / expected[cells]).sum()
    dof = int(cells.sum()) - 1
    # Upper regularised incomplete gamma Q(dof/2, stat/2) is the chi-square survival function.
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def _seeded_counts(logits_row: torch.Tensor, n: int, seed: int = 1234, **params) -> torch.Tensor:
    """Histogram of n draws of one row, varying only the counter."""
    logits = logits_row[None, :].expand(n, -1).contiguous()
    out = _run(logits, seed=seed, counter=torch.arange(n) + 7, **params)
    return torch.bincount(out.token_ids.long(), minlength=logits_row.numel())


def _reference_filtered_probs(
    logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """Straightforward per-row reference of top-k -> top-p -> min-p on the tempered distribution."""
    probs = torch.softmax(logits_row.double() / temperature, dim=-1)
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    kept = order[:top_k] if top_k > 0 else order
    if top_p < 1.0:
        mass = sum(probs[i].item() for i in kept)
        nucleus, acc = [], 0.0
        for i in kept:
            nucleus.append(i)
            acc += probs[i].item() / mass
            if acc >= top_p:
                break
        kept = nucleus
    if min_p > 0.0:
        p_max = probs[kept[0]].item()
        kept = [i for i in kept if probs[i].item() >= min_p * p_max]
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


SMALL_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -2.0])


def test_greedy_is_argmax_of_raw_logits_whatever_the_other_params() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 300, generator=gen) * 3
    out = _run(
        logits,
        temperature=0.0,
        top_k=[int(k) for k in torch.randint(0, 5, (32,), generator=gen)],
        top_p=0.3,
        min_p=0.5,
        seed=list(range(32)),
        counter=list(range(100, 132)),
    )
    assert out.token_ids.dtype == torch.int32
    assert torch.equal(out.token_ids.long(), logits.argmax(dim=-1))


def test_greedy_ties_pick_lowest_index() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, 5.0], [7.0, 7.0, 7.0, 7.0, 7.0]])
    out = _run(logits, temperature=0.0)
    assert out.token_ids.tolist() == [1, 0]


def test_greedy_and_sampled_rows_mix_in_one_batch() -> None:
    logits = SMALL_LOGITS[None, :].expand(64, -1).contiguous()
    temperature = [0.0 if r % 2 == 0 else 5.0 for r in range(64)]
    out = _run(logits, temperature=temperature, counter=list(range(64)))
    assert (out.token_ids[0::2] == 0).all()
    # At temperature 5 the distribution is nearly flat, so odd rows cannot all be the argmax.
    assert len(set(out.token_ids[1::2].tolist())) > 3


def _random_params(gen: torch.Generator, rows: int) -> dict[str, list]:
    return {
        "temperature": [float(t) for t in torch.rand(rows, generator=gen) * 1.5],
        "top_p": [float(p) for p in 0.2 + 0.8 * torch.rand(rows, generator=gen)],
        "top_k": [int(k) for k in torch.randint(0, 50, (rows,), generator=gen)],
        "min_p": [float(m) for m in torch.rand(rows, generator=gen) * 0.3],
        "seed": [int(s) for s in torch.randint(INT64_MIN, INT64_MAX, (rows,), generator=gen)],
        "counter": [int(c) for c in torch.randint(0, 10_000, (rows,), generator=gen)],
    }


def test_seeded_token_does_not_depend_on_batch_mates_position_or_batch_size() -> None:
    gen = torch.Generator().manual_seed(1)
    vocab = 512
    for case in range(6):
        target_logits = torch.randn(1, vocab, generator=gen) * 2
        target = {
            "temperature": 0.7 + 0.2 * case,
            "top_p": [1.0, 0.9, 0.5][case % 3],
            "top_k": [0, 40][case % 2],
            "min_p": [0.0, 0.05][case % 2],
            "seed": [12345, -7, INT64_MIN, INT64_MAX, 0, 99][case],
            "counter": 17 + 1000 * case,
        }
        alone = _run(target_logits, **{k: [v] for k, v in target.items()}, num_top=5)
        for batch_size, positions in ((16, range(16)), (3, (0, 2))):
            for pos in positions:
                mates = _random_params(gen, batch_size)
                logits = torch.randn(batch_size, vocab, generator=gen) * 2
                logits[pos] = target_logits[0]
                for key, value in target.items():
                    mates[key][pos] = value
                batch = _run(logits, **mates, num_top=5)
                assert batch.token_ids[pos] == alone.token_ids[0], (case, batch_size, pos)
                assert batch.logprob[pos] == alone.logprob[0]
                assert torch.equal(batch.top_ids[pos], alone.top_ids[0])


def _joint_independence_pvalue(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    """Chi-square test that paired draws from the uniform distribution over `vocab` are independent."""
    joint = torch.bincount(a.long() * vocab + b.long(), minlength=vocab * vocab)
    return _chi2_pvalue(joint, torch.full((vocab * vocab,), 1.0 / (vocab * vocab)))


@pytest.mark.parametrize(
    "seed_a, seed_b",
    [(1, 2), (0, 1 << 32), (INT64_MIN, INT64_MIN + 1), (-1, INT64_MAX)],
    ids=["adjacent", "high-word-only", "int64-min", "sign-bit"],
)
def test_different_seeds_give_independent_streams(seed_a: int, seed_b: int) -> None:
    vocab, n = 8, 6400
    logits = torch.zeros(n, vocab)
    a = _run(logits, seed=seed_a, counter=torch.arange(n)).token_ids
    b = _run(logits, seed=seed_b, counter=torch.arange(n)).token_ids
    assert _joint_independence_pvalue(a, b, vocab) > 1e-4
    # Power check: a stream against itself is maximally dependent.
    assert _joint_independence_pvalue(a, a, vocab) < 1e-12


def test_successive_counters_are_independent() -> None:
    vocab, n = 8, 6401
    draws = _run(torch.zeros(n, vocab), seed=42, counter=torch.arange(n)).token_ids
    assert _joint_independence_pvalue(draws[:-1], draws[1:], vocab) > 1e-4
    # Counters that differ only in their high 32 bits must not repeat the stream either.
    high = _run(torch.zeros(n, vocab), seed=42, counter=torch.arange(n) + (1 << 32)).token_ids
    assert _joint_independence_pvalue(draws, high, vocab) > 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("seed", [1234, INT64_MIN + 3])
def test_seeded_samples_follow_tempered_softmax(temperature: float, seed: int) -> None:
    counts = _seeded_counts(SMALL_LOGITS, 20_000, seed=seed, temperature=temperature)
    expected = torch.softmax(SMALL_LOGITS.double() / temperature, dim=-1)
    assert _chi2_pvalue(counts, expected) > 1e-4
    # The same counts must be clearly incompatible with a wrong temperature.
    wrong = torch.softmax(SMALL_LOGITS.double() / (temperature * 1.25), dim=-1)
    assert _chi2_pvalue(counts, wrong) < 1e-6


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [
        (1.0, 3, 1.0, 0.0),
        (1.0, 0, 0.6, 0.0),
        (0.5, 0, 0.9, 0.0),
        (1.0, 0, 1.0, 0.2),
        (2.0, 0, 1.0, 0.5),
        (1.0, 5, 0.8, 0.0),
        (1.5, 6, 0.9, 0.3),
    ],
)
def test_filtered_samples_follow_renormalised_distribution(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    counts = _seeded_counts(SMALL_LOGITS, 20_000, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    expected = _reference_filtered_probs(SMALL_LOGITS, temperature, top_k, top_p, min_p)
    # The reference must actually filter something, otherwise the case tests nothing.
    assert (expected == 0).any()
    assert counts[expected == 0].sum() == 0, "a filtered-out token was sampled"
    assert _chi2_pvalue(counts, expected) > 1e-4
    unfiltered = torch.softmax(SMALL_LOGITS.double() / temperature, dim=-1)
    assert _chi2_pvalue(counts[expected > 0], unfiltered[expected > 0]) < 1e-6


def test_filters_never_emit_excluded_tokens_on_a_large_vocab() -> None:
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 256, 2000
    logits = (torch.randn(1, vocab, generator=gen) * 3).expand(rows, -1).contiguous()
    probs = torch.softmax(logits[0], dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)
    top10 = set(order[:10].tolist())
    out = _run(logits, top_k=10, counter=list(range(rows)))
    assert set(out.token_ids.tolist()) <= top10
    out = _run(logits, min_p=0.3, counter=list(range(rows)))
    assert (probs[out.token_ids.long()] >= 0.3 * probs.max()).all()
    cum = torch.cumsum(probs[order], dim=0)
    nucleus = set(order[: int((cum < 0.5).sum()) + 1].tolist())
    out = _run(logits, top_p=0.5, counter=list(range(rows)))
    assert set(out.token_ids.tolist()) <= nucleus


def test_top_p_tiny_keeps_only_the_top_token() -> None:
    logits = SMALL_LOGITS[None, :].expand(200, -1).contiguous()
    out = _run(logits, top_p=1e-6, temperature=3.0, counter=list(range(200)))
    assert (out.token_ids == 0).all()


def test_filters_that_are_off_or_non_binding_change_no_token() -> None:
    gen = torch.Generator().manual_seed(4)
    rows, vocab = 512, 64
    logits = torch.randn(rows, vocab, generator=gen) * 4
    base = _run(logits, seed=77, counter=list(range(rows))).token_ids
    for params in ({"top_k": vocab}, {"top_k": vocab + 100}, {"top_p": 1.0}, {"min_p": 0.0}):
        out = _run(logits, seed=77, counter=list(range(rows)), **params).token_ids
        assert torch.equal(out, base), params
    # A row whose filters are off is unaffected by a filtering batch-mate.
    mixed = _run(logits, seed=77, counter=list(range(rows)), top_k=[0, 1] * (rows // 2)).token_ids
    assert torch.equal(mixed[0::2], base[0::2])


def test_sort_filters_hint_off_skips_only_top_k_and_top_p() -> None:
    gen = torch.Generator().manual_seed(9)
    rows, vocab = 256, 64
    logits = torch.randn(rows, vocab, generator=gen) * 3
    params = {"seed": 5, "counter": list(range(rows)), "temperature": 0.8, "min_p": 0.1}
    base = _run(logits, **params).token_ids
    hinted = sample(
        logits,
        torch.full((rows,), 0.8),
        torch.ones(rows),
        torch.zeros(rows, dtype=torch.int32),
        torch.full((rows,), 0.1),
        torch.full((rows,), 5, dtype=torch.int64),
        torch.arange(rows),
        0,
        sort_filters=False,
    ).token_ids
    # With no row asking for top-k/top-p the hint changes nothing, and min-p still applies.
    assert torch.equal(hinted, base)
    assert not torch.equal(base, _run(logits, seed=5, counter=list(range(rows)), temperature=0.8).token_ids)


def test_low_probability_tail_is_reachable_when_filters_are_off() -> None:
    # Without a filter even the least likely token must show up at a plausible rate.
    vocab, n = 8, 20_000
    logits = torch.zeros(vocab)
    logits[0] = 3.0
    counts = _seeded_counts(logits, n)
    assert (counts > 0).all()


def test_logprob_outputs_match_raw_log_softmax() -> None:
    gen = torch.Generator().manual_seed(5)
    rows, vocab, k = 12, 97, 6
    logits = torch.randn(rows, vocab, generator=gen) * 2
    out = _run(logits, temperature=[0.0, 0.3, 1.0, 2.5] * 3, top_k=5, counter=list(range(rows)), num_top=k)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprob.dtype == torch.float32 and out.top_logprobs.dtype == torch.float32
    assert out.top_ids.dtype == torch.int32 and out.top_ids.shape == (rows, k)
    # Sampled-token logprob is under the raw distribution, not the tempered/filtered one.
    torch.testing.assert_close(out.logprob, ref.gather(1, out.token_ids.long()[:, None]).squeeze(1))
    ref_vals, ref_ids = ref.topk(k, dim=-1)
    assert torch.equal(out.top_ids.long(), ref_ids)
    torch.testing.assert_close(out.top_logprobs, ref_vals)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_num_top_zero_gives_empty_columns() -> None:
    out = _run(torch.randn(5, 11), num_top=0)
    assert out.top_ids.shape == (5, 0) and out.top_ids.dtype == torch.int32
    assert out.top_logprobs.shape == (5, 0) and out.top_logprobs.dtype == torch.float32
    with pytest.raises(ValueError):
        _run(torch.randn(5, 11), num_top=12)


def test_half_precision_logits_are_upcast() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(16, 128, generator=gen)
    full = _run(logits, seed=9, counter=list(range(16)), num_top=3)
    bf16 = _run(logits.to(torch.bfloat16), seed=9, counter=list(range(16)), num_top=3)
    assert bf16.logprob.dtype == torch.float32 and bf16.top_logprobs.dtype == torch.float32
    ref = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1)
    torch.testing.assert_close(bf16.logprob, ref.gather(1, bf16.token_ids.long()[:, None]).squeeze(1))
    assert full.token_ids.shape == bf16.token_ids.shape


def test_tiny_temperature_is_stable_and_near_greedy() -> None:
    logits = torch.tensor([[1000.0, 999.0, -1000.0, 0.0]] * 8)
    out = _run(logits, temperature=1e-6, counter=list(range(8)), num_top=2)
    assert (out.token_ids == 0).all()
    assert torch.isfinite(out.logprob).all()


def test_non_finite_logits_do_not_crash_and_are_flagged_by_nan_logprob() -> None:
    vocab = 16
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, vocab, generator=gen)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2, :] = float("-inf")
    logits[3, :] = float("nan")
    logits[4, :10] = float("-inf")  # ordinary masking: must stay a healthy row
    for temperature in (0.0, 1.0):
        out = _run(logits, temperature=temperature, top_k=4, top_p=0.9, min_p=0.1, counter=list(range(6)), num_top=3)
        assert ((out.token_ids >= 0) & (out.token_ids < vocab)).all()
        assert out.logprob[:4].isnan().all()
        assert out.top_logprobs[:4].isnan().all()
        assert torch.isfinite(out.logprob[4:]).all()
        assert out.token_ids[4] >= 10
        healthy = _run(logits[4:], temperature=temperature, top_k=4, top_p=0.9, min_p=0.1, counter=[4, 5], num_top=3)
        assert torch.equal(out.token_ids[4:], healthy.token_ids)


def test_runs_on_meta_tensors_so_nothing_reads_values_on_the_host() -> None:
    # Any .item()/.tolist()/bool(tensor) or data-dependent shape raises on the meta device; passing
    # here is what lets the sampler be captured in a CUDA graph.
    rows, vocab = 4, 32
    meta = torch.device("meta")
    out = sample(
        torch.empty(rows, vocab, dtype=torch.bfloat16, device=meta),
        torch.empty(rows, device=meta),
        torch.empty(rows, device=meta),
        torch.empty(rows, dtype=torch.int32, device=meta),
        torch.empty(rows, device=meta),
        torch.empty(rows, dtype=torch.int64, device=meta),
        torch.empty(rows, dtype=torch.int64, device=meta),
        3,
    )
    assert out.token_ids.shape == (rows,) and out.top_ids.shape == (rows, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_captures_in_a_cuda_graph() -> None:
    gen = torch.Generator().manual_seed(8)
    rows, vocab = 16, 4096
    params = _random_params(gen, rows)
    logits = torch.randn(rows, vocab, generator=gen) * 2
    cpu = _run(logits, **params, num_top=4)
    args = [
        logits,
        torch.tensor(params["temperature"]),
        torch.tensor(params["top_p"]),
        torch.tensor(params["top_k"], dtype=torch.int32),
        torch.tensor(params["min_p"]),
        torch.tensor(params["seed"], dtype=torch.int64),
        torch.tensor(params["counter"], dtype=torch.int64),
    ]
    cuda_args = [a.cuda() for a in args]
    eager = sample(*cuda_args, 4)
    assert torch.equal(eager.token_ids.cpu(), cpu.token_ids)
    assert torch.equal(eager.top_ids.cpu(), cpu.top_ids)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample(*cuda_args, 4)  # warm-up outside the graph, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sample(*cuda_args, 4)
    cuda_args[6].add_(1)  # next position: replay must pick up the new counters
    graph.replay()
    torch.cuda.synchronize()
    shifted = _run(logits, **{**params, "counter": [c + 1 for c in params["counter"]]}, num_top=4)
    assert torch.equal(captured.token_ids.cpu(), shifted.token_ids)
