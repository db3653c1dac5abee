"""worker_svc/penalties.py on its own: the per-slot state a plan starts, the transforms against a
direct formula, counts rebuilt from history equal to counts recorded token by token, neutral rows
untouched, and (CUDA) the same values eagerly and inside a captured CUDA graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tandem.wire import StepPlan

from worker_svc.penalties import PenaltyState

V, S = 64, 4


def _plan(slots, rep, pres, freq, min_tokens, prompt_len, bias, mask, history) -> StepPlan:
    n = len(slots)
    one = np.zeros(1, np.int32)
    return StepPlan(
        step_id=0, carry_from_step=-1, flush=True, rows=one, query_start=np.array([0, 1], np.int32), input_ids=one,
        carry_index=np.full(1, -1, np.int32), sample=one, new_slots=np.array(slots, np.int32),
        new_context=np.zeros(n, np.int32), new_temperature=np.zeros(n, np.float32), new_top_p=np.ones(n, np.float32),
        new_top_k=np.zeros(n, np.int32), new_min_p=np.zeros(n, np.float32), new_seed=np.zeros(n, np.uint64),
        new_num_logprobs=np.full(n, -1, np.int32),
        new_repetition_penalty=np.array(rep, np.float32), new_presence_penalty=np.array(pres, np.float32),
        new_frequency_penalty=np.array(freq, np.float32), new_min_tokens=np.array(min_tokens, np.int32),
        new_prompt_len=np.array(prompt_len, np.int32),
        new_bias_count=np.array([len(b) for b in bias], np.int32),
        bias_ids=np.array([t for b in bias for t in b], np.int32),
        bias_values=np.array([v for b in bias for v in b.values()], np.float32),
        new_mask_count=np.array([len(m) for m in mask], np.int32),
        mask_ids=np.array([t for m in mask for t in m], np.int32),
        new_history_len=np.array([len(h) for h in history], np.int32),
        history=np.array([t for h in history for t in h], np.int32),
    )


HIST = [3, 5, 5, 9, 5, 7]  # prompt 3 tokens, outputs 9 5 7


def _state(device: str) -> PenaltyState:
    st = PenaltyState(S, V, device)
    st.start_slots(_plan([0, 2], rep=[1.5, 1.0], pres=[0.5, 0.0], freq=[0.25, 0.0], min_tokens=[0, 0],
                         prompt_len=[3, 3], bias=[{4: 2.0}, {}], mask=[[], []], history=[HIST, []]))
    return st


def _expected(x: torch.Tensor) -> torch.Tensor:
    """Row 0 (slot 0) by the formulas; row 1 (slot 2, neutral) unchanged."""
    y = x.clone()
    y[0, 4] += 2.0
    for t in set(HIST):
        y[0, t] = y[0, t] / 1.5 if y[0, t] > 0 else y[0, t] * 1.5
    for t, c in {9: 1, 5: 1, 7: 1}.items():
        y[0, t] -= c * 0.25 + 0.5
    return y


def test_transforms_match_the_formulas_and_leave_neutral_rows_alone() -> None:
    st = _state("cpu")
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    flags = st.flags(np.array([0, 2]))
    assert flags.repetition and flags.counts and flags.bias and not flags.mask
    assert not st.flags(np.array([2])).any  # a neutral slot alone: nothing runs
    out = st.apply(x, torch.tensor([0, 2]), torch.tensor([6, 3]), flags)
    assert torch.equal(out[1], x[1])
    torch.testing.assert_close(out, _expected(x), rtol=0, atol=1e-6)


def test_rebuilt_counts_equal_recorded_counts() -> None:
    rebuilt = _state("cpu")
    live = PenaltyState(S, V, "cpu")
    live.start_slots(_plan([0], rep=[1.5], pres=[0.5], freq=[0.25], min_tokens=[0], prompt_len=[3], bias=[{}],
                           mask=[[]], history=[HIST[:3]]))
    flags = live.flags(np.array([0]))
    for t in HIST[3:]:  # as the steps would: one sampled token each
        live.record(torch.tensor([0]), torch.tensor([t], dtype=torch.int32), flags)
    assert torch.equal(live.counts[0], rebuilt.counts[0]) and torch.equal(live.seen[0], rebuilt.seen[0])


def test_min_tokens_masks_until_reached() -> None:
    st = PenaltyState(S, V, "cpu")
    st.start_slots(_plan([1], rep=[1.0], pres=[0.0], freq=[0.0], min_tokens=[2], prompt_len=[5], bias=[{}],
                         mask=[[0, 2]], history=[[]]))
    x = torch.zeros(1, V)
    flags = st.flags(np.array([1]))
    for pos, masked in ((5, True), (6, True), (7, False)):
        out = st.apply(x, torch.tensor([1]), torch.tensor([pos]), flags)
        assert bool(torch.isinf(out[0, 0])) == masked and bool(torch.isinf(out[0, 2])) == masked
        assert torch.isfinite(out[0, 1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_captures_in_a_cuda_graph() -> None:
    cpu, cuda = _state("cpu"), _state("cuda")
    torch.cuda.synchronize()
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(2))
    flags = cpu.flags(np.array([0, 2]))
    slots, counter = torch.tensor([0, 2]), torch.tensor([6, 3])
    want = cpu.apply(x, slots, counter, flags)
    args = (x.cuda(), slots.cuda(), counter.cuda())
    assert torch.equal(cuda.apply(*args, flags).cpu(), want)
    tokens = torch.tensor([4, 1], dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda.apply(*args, flags)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda.apply(*args, flags)
        cuda.record(args[1], tokens, flags)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), want)
    cpu.record(slots, tokens.cpu(), flags)
    assert torch.equal(cuda.counts.cpu(), cpu.counts) and torch.equal(cuda.seen.cpu(), cpu.seen)
