"""worker_svc/penalties.py on its own: the per-slot state a plan starts, the transforms against a
direct formula, counts rebuilt from history equal to counts recorded token by token, neutral rows
untouched, and (CUDA) the same values eagerly and inside a captured CUDA graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tandem.wire import StepPlan

from worker_svc.penalties import ALL, PenaltyState

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


def test_every_transform_on_neutral_rows_is_exact_and_the_trash_row_absorbs_padding() -> None:
    """What a penalized decode graph relies on: `apply` with every transform (ALL) gives the flagged
    result bit for bit, neutral and trash rows unchanged; `record` with the trash row repeated (the
    graph's padding rows) counts nothing into a real slot."""
    st = _state("cpu")
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([0, 2, st.trash])
    flagged = st.apply(x[:2], slots[:2], torch.tensor([6, 3]), st.flags(np.array([0, 2])))
    every = st.apply(x, slots, torch.tensor([6, 3, 0]), ALL)
    assert torch.equal(every[:2], flagged) and torch.equal(every[1:], x[1:])
    before = st.counts.clone()
    st.record(torch.tensor([st.trash, 2, st.trash]), torch.tensor([4, 9, 4], dtype=torch.int32), ALL)
    assert torch.equal(st.counts[:2], before[:2]) and int(st.counts[2, 9]) == 1 and int(st.counts[st.trash, 4]) == 2


# ----- the engine: penalized decode steps at depth 2, in a CUDA graph or eagerly, on CUDA and CPU ------
# A +16 bias on three ids makes the random model's greedy choice repeat them, so every penalty has
# tokens to act on (as in test_sampling_controls); min_tokens masks them for the first tokens.
BIAS = {300: 16.0, 301: 16.0, 302: 16.0}
PARAMS = [
    {"rep": 1.8, "bias": BIAS},
    {"pres": 1.5, "freq": 0.5, "bias": BIAS},
    {"min_tokens": 4, "mask": [300, 301, 302], "bias": BIAS, "freq": 0.25},
    {},  # unpenalized: shares the steps, keeps its tokens
    {"rep": 0.7, "bias": BIAS},
]  # 5 rows: the decode graph's bucket of 8 has 3 padding rows (they must count into the trash row only)
DECODE_STEPS = 10


def _with_penalties(plan: StepPlan, reqs: list, params: list[dict]) -> StepPlan:
    """The plan's new slots (reqs, in their order) take `params`; penalized ones carry their prompt
    as history (as scheduler_svc/core/plan_params does)."""
    import dataclasses

    def col(key: str, default: float, dtype: str) -> np.ndarray:
        return np.array([p.get(key, default) for p in params], dtype)

    penalized = [p.get("rep", 1.0) != 1.0 or p.get("pres", 0.0) != 0 or p.get("freq", 0.0) != 0 for p in params]
    hist = [r.prompt if pen else [] for r, pen in zip(reqs, penalized, strict=True)]
    return dataclasses.replace(
        plan, new_repetition_penalty=col("rep", 1.0, "float32"), new_presence_penalty=col("pres", 0.0, "float32"),
        new_frequency_penalty=col("freq", 0.0, "float32"), new_min_tokens=col("min_tokens", 0, "int32"),
        new_prompt_len=np.array([len(r.prompt) for r in reqs], np.int32),
        new_bias_count=np.array([len(p.get("bias", {})) for p in params], np.int32),
        bias_ids=np.array([t for p in params for t in p.get("bias", {})], np.int32),
        bias_values=np.array([v for p in params for v in p.get("bias", {}).values()], np.float32),
        new_mask_count=np.array([len(p.get("mask", [])) for p in params], np.int32),
        mask_ids=np.array([t for p in params for t in p.get("mask", [])], np.int32),
        new_history_len=np.array([len(h) for h in hist], np.int32),
        history=np.array([t for h in hist for t in h], np.int32),
    )


def _engine(loaded, **cfg):
    from worker_svc.runner import Engine, EngineConfig

    device = next(loaded.model.parameters()).device.type
    return Engine(loaded, EngineConfig(block_size=16, num_blocks=64, max_num_tokens=128, max_num_rows=8, **cfg),
                  device)


def _depth_two(engine, params: list[dict] = PARAMS) -> list:
    """A penalized prefill, then DECODE_STEPS decode steps each launched before the previous one's
    tokens are known (every decode input is a carried-over token), rows rotated every step so
    carry_index is a real permutation. Returns the requests with their outputs."""
    from tests.test_worker_runner import Planner, Req

    planner = Planner(64)
    rng = np.random.default_rng(5)
    reqs = [Req(rng.integers(3, 200, size=n).tolist()) for n in (9, 17, 30, 12, 20)][:len(params)]
    engine.launch(_with_penalties(planner.plan([(r, len(r.prompt), True) for r in reqs]), reqs, params))
    launched = [list(reqs)]
    for i in range(DECODE_STEPS):
        order = reqs[i % len(reqs):] + reqs[:i % len(reqs)]
        prev = launched[-1]
        engine.launch(planner.plan([(r, 1, True) for r in order], carry={row: prev.index(r) for row, r in
                                                                        enumerate(order)}))
        launched.append(order)
        res = engine.collect()
        for r, tok in zip(launched[-2], res.sampled, strict=True):
            r.out.append(int(tok))
    res = engine.collect()
    for r, tok in zip(launched[-1], res.sampled, strict=True):
        r.out.append(int(tok))
    return reqs


def _assert_counts_hold_every_token(engine, reqs: list, params: list[dict]) -> None:
    """The device counts of each penalized slot are exactly its outputs (carried-over tokens
    included: all but the prefill's were carried), seen = prompt + outputs."""
    pen = engine.penalties
    counts, seen = pen.counts.cpu(), pen.seen.cpu()
    for r, p in zip(reqs, params, strict=True):
        if r.slot < 0 or not (p.get("rep", 1.0) != 1.0 or p.get("pres", 0.0) or p.get("freq", 0.0)):
            continue
        want = torch.bincount(torch.tensor(r.out), minlength=V_MODEL).to(torch.int32)
        assert torch.equal(counts[r.slot], want), f"slot {r.slot}: counts differ from its outputs {r.out}"
        assert set(torch.nonzero(seen[r.slot]).flatten().tolist()) == set(r.prompt + r.out)


V_MODEL = 49152  # tiny-llama's vocabulary


def _tiny(device: str):
    from worker_svc import models

    return models.load("random:tiny-llama", device, torch.float32, seed=0)


def test_depth_two_penalized_decode_counts_carried_tokens_cpu() -> None:
    """CPU: the penalties act (tokens differ from the unpenalized run), min_tokens holds the masked
    ids off, the unpenalized row keeps its tokens, and the counts hold every carried token."""
    loaded = _tiny("cpu")
    engine = _engine(loaded)
    reqs = _depth_two(engine)
    plain = _depth_two(_engine(loaded), [{}] * len(PARAMS))
    _assert_counts_hold_every_token(engine, reqs, PARAMS)
    assert reqs[3].out == plain[3].out
    for r, p in zip(reqs[:3] + reqs[4:], plain[:3] + plain[4:], strict=True):
        assert r.out != p.out
    assert not set(reqs[2].out[:PARAMS[2]["min_tokens"]]) & set(PARAMS[2]["mask"])
    assert set(reqs[2].out[PARAMS[2]["min_tokens"]:]) & set(PARAMS[2]["mask"]), "the bias should win after"
    assert engine.step_counts["penalized"] == 0 and engine.step_counts["decode"] == 0  # no graphs on CPU


needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@needs_cuda[0]
@needs_cuda[1]
def test_cuda_penalized_decode_replays_its_graph_and_equals_eager_and_cpu() -> None:
    """CUDA: every penalized decode step at depth 2 replays the penalized decode graph (counted), and
    gives the tokens and counts of the same engine sampling eagerly (no penalty graphs), of an engine
    without CUDA graphs, and of the CPU path; counts include every carried-over token."""
    loaded = _tiny("cuda")
    graphed = _engine(loaded)
    assert graphed.graphs is not None and graphed.graphs.penalized
    got = _depth_two(graphed)
    assert graphed.step_counts["penalized"] == DECODE_STEPS, graphed.step_counts
    assert graphed.step_counts["decode"] == 0  # no decode step of these ran without its penalties
    _assert_counts_hold_every_token(graphed, got, PARAMS)
    for name, engine in (("eager sampling", _engine(loaded, penalty_graphs=False)),
                         ("no CUDA graphs", _engine(loaded, cuda_graphs=False))):
        want = _depth_two(engine)
        assert engine.step_counts["penalized"] == 0, name
        assert [r.out for r in got] == [r.out for r in want], name
        assert torch.equal(graphed.penalties.counts[:8], engine.penalties.counts[:8]), name
    # The same weights on the CPU (random weights drawn on each device differ: CUDA's generator is not
    # the CPU's), so that only the device's arithmetic differs.
    on_cpu = _tiny("cpu")
    on_cpu.model.load_state_dict({k: v.cpu() for k, v in loaded.model.state_dict().items()})
    cpu = _depth_two(_engine(on_cpu))
    assert [r.out for r in got] == [r.out for r in cpu], "CUDA graph vs CPU (a near-tie would show here)"
    # An unpenalized decode step still replays the plain graph.
    from tests.test_worker_runner import Planner, Req

    plain, planner = _engine(loaded), Planner(64)
    req = Req(list(range(5, 25)))
    req.out.append(int(plain.execute(planner.plan([(req, len(req.prompt), True)])).sampled[0]))
    plain.execute(planner.plan([(req, 1, True)]))
    assert plain.step_counts["decode"] == 1 and plain.step_counts["penalized"] == 0


@needs_cuda[0]
@needs_cuda[1]
def test_cuda_penalized_admission_never_waits_for_the_device() -> None:
    """Admitting penalized slots (parameters, bias, mask, a history to count) issues its copies
    without a host sync and without waiting: launch returns while the compute stream is still busy
    with ~1 s of sleep queued ahead of it, and the state it writes is right once it runs."""
    import time

    from tests.test_worker_runner import Planner, Req

    engine, planner = _engine(_tiny("cuda")), Planner(64)
    a, warm, b = (Req(list(range(k, k + 20))) for k in (10, 40, 70))
    a.out.append(int(engine.execute(_with_penalties(planner.plan([(a, 20, True)]), [a], PARAMS[:1])).sampled[0]))
    # Warm-up of the very shape timed below (a decode row + a new penalized 20-token prompt): every
    # kernel is compiled and every buffer allocated before the clock starts.
    res = engine.execute(_with_penalties(planner.plan([(a, 1, True), (warm, 20, True)]), [warm], PARAMS[1:2]))
    a.out.append(int(res.sampled[0]))
    torch.cuda.synchronize()
    with torch.cuda.stream(engine.sync.compute_stream):
        torch.cuda._sleep(2_000_000_000)  # ~1 s at ~2 GHz
    plan = _with_penalties(planner.plan([(a, 1, True), (b, 20, True)]), [b], PARAMS[1:2])
    torch.cuda.set_sync_debug_mode("error")
    try:
        t0 = time.perf_counter()
        engine.launch(plan)
        took = time.perf_counter() - t0
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not engine.sync.compute_stream.query(), "the sleep should still be running"
    res = engine.collect()
    assert took < 0.25, f"launch took {took:.3f} s: it waited for the device"
    b.out.append(int(res.sampled[1]))
    seen = engine.penalties.seen[b.slot].cpu()
    assert set(torch.nonzero(seen).flatten().tolist()) == set(b.prompt + b.out)
    assert float(engine.penalties.d_pres[b.slot]) == 1.5 and float(engine.penalties.d_freq[b.slot]) == 0.5
