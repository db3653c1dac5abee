"""The in-process engine driven by hand-built StepPlans gives transformers' own greedy tokens.

Random tiny-llama weights are built twice from the same seed: once for our engine (paged attention)
and once, untouched, for `model.generate` (SDPA, DynamicCache), so a mismatch anywhere in the KV
paging, chunked prefill, mixed batches, logits selection or carry-over changes tokens.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from tandem.wire import StepPlan, WireError

from worker_svc import models, presets
from worker_svc.runner import Engine, EngineConfig

BLOCK = 16
CHUNK = 32
# CPU always; CUDA where present (real streams, events, pinned buffers; same expectations).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@dataclass
class Req:
    prompt: list[int]
    blocks: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V the engine has been asked to store
    slot: int = -1  # the engine's row slot, given on the request's first plan

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out


class Planner:
    """A minimal hand scheduler: row slots, block allocation and incremental plans, nothing else."""

    def __init__(self, num_blocks: int, num_slots: int = 8) -> None:
        self.free = list(range(num_blocks))[::-1]  # hand out high ids first: not the identity mapping
        self.free_slots = list(range(num_slots))  # slot != row: rows come in other orders
        self.step_id = 0

    def plan(self, rows: list[tuple[Req, int, bool]], carry: dict[int, int] | None = None,
             num_logprobs: int = -1) -> StepPlan:
        """rows: (request, tokens this step, sample?). carry: row -> row of the previous step whose
        sampled token is this row's (still unknown) input. num_logprobs: for requests new in this plan."""
        carry = carry or {}
        ids, starts, new, app_slots, app_blocks = [], [0], [], [], []
        for r, (req, n, _) in enumerate(rows):
            if req.slot < 0:
                req.slot = self.free_slots.pop()
                new.append(req)
            end = req.cached + n
            while len(req.blocks) * BLOCK < end:
                req.blocks.append(self.free.pop())
                app_slots.append(req.slot)
                app_blocks.append(req.blocks[-1])
            for p in range(req.cached, end):
                known = p < len(req.tokens)
                assert known or (r in carry and n == 1), "input token unknown and not carried"
                ids.append(req.tokens[p] if known else 0)
            req.cached = end
            starts.append(starts[-1] + n)
        nr, nn = len(rows), len(new)
        plan = StepPlan(
            step_id=self.step_id, carry_from_step=self.step_id - 1 if carry else -1, flush=False,
            rows=np.array([req.slot for req, _, _ in rows], np.int32), query_start=np.array(starts, np.int32),
            input_ids=np.array(ids, np.int32), carry_index=np.array([carry.get(r, -1) for r in range(nr)], np.int32),
            sample=np.array([int(s) for _, _, s in rows], np.int32),
            new_slots=np.array([req.slot for req in new], np.int32), new_context=np.zeros(nn, np.int32),
            new_temperature=np.zeros(nn, np.float32),
            new_top_p=np.ones(nn, np.float32), new_top_k=np.zeros(nn, np.int32), new_min_p=np.zeros(nn, np.float32),
            new_seed=np.array([req.slot for req in new], np.uint64),
            new_num_logprobs=np.full(nn, num_logprobs, np.int32),
            append_slots=np.array(app_slots, np.int32), append_blocks=np.array(app_blocks, np.int32),
        )
        self.step_id += 1
        return plan


def prefill_rows(req: Req) -> list[int]:
    """Chunk sizes for the rest of a prompt."""
    left = len(req.prompt) - req.cached
    return [min(CHUNK, left - i) for i in range(0, left, CHUNK)]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=DEVICES)
def tiny(request) -> tuple[models.LoadedModel, object]:
    ours = models.load("random:tiny-llama", request.param, torch.float32, seed=0)
    ref = models.load("random:tiny-llama", request.param, torch.float32, seed=0).model
    return ours, ref


def make_engine(loaded: models.LoadedModel) -> Engine:
    device = next(loaded.model.parameters()).device.type
    return Engine(loaded, EngineConfig(block_size=BLOCK, num_blocks=64, max_num_tokens=128, max_num_rows=8),
                  device)


def test_random_weights_are_reproducible(tiny) -> None:
    ours, ref = tiny
    for (name, a), (_, b) in zip(ours.model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    other = models.load("random:tiny-llama", ref.device.type, torch.float32, seed=1).model
    assert not torch.equal(other.lm_head.weight, ref.lm_head.weight), "seed ignored"


def test_chunked_prefill_decode_and_mixed_steps_match_generate(tiny) -> None:
    ours, ref = tiny
    engine = make_engine(ours)
    planner = Planner(64)
    rng = np.random.default_rng(0)
    reqs = [Req(rng.integers(3, 49152, size=n).tolist()) for n in (5, 23, 70, 1)]
    late = Req(rng.integers(3, 49152, size=40).tolist())  # joins while the others decode
    steps_out = 6

    # Prefill: every request one chunk per step, sampling only on its last chunk.
    while any(r.cached < len(r.prompt) for r in reqs):
        rows = []
        for r in reqs:
            if r.cached < len(r.prompt):
                n = prefill_rows(r)[0]
                rows.append((r, n, r.cached + n == len(r.prompt)))
        res = engine.execute(planner.plan(rows, num_logprobs=3))
        for (r, _, s), tok in zip(rows, res.sampled, strict=True):
            assert (tok >= 0) == s, "a row sampled iff it asked to"
            if s:
                r.out.append(int(tok))

    # Decode, then mixed: the late prompt's chunks share steps with decode rows (one asks logprobs).
    for i in range(steps_out):
        rows = [(r, 1, True) for r in reqs]
        if i >= 2 and late.cached < len(late.prompt):
            n = prefill_rows(late)[0]
            rows.append((late, n, late.cached + n == len(late.prompt)))
        elif late.out:
            rows.append((late, 1, True))
        res = engine.execute(planner.plan(rows, num_logprobs=3))
        assert res.top_ids is not None and res.top_ids.shape == (len(rows), 3)
        for r_i, ((r, _, s), tok) in enumerate(zip(rows, res.sampled, strict=True)):
            if s:
                r.out.append(int(tok))
                assert res.top_ids[r_i, 0] == tok, "greedy token is not the top logprob"
                assert res.logprob[r_i] == pytest.approx(res.top_logprobs[r_i, 0])
        assert res.compute_ms > 0

    for r in [*reqs, late]:
        assert r.out == greedy_reference(ref, r.prompt, len(r.out)), f"prompt of {len(r.prompt)} tokens"
    assert len(late.out) >= 2


def test_depth_two_carry_over_matches_generate(tiny) -> None:
    """Step N+1 is launched before N's tokens are known: decode rows get input 0 + carry_index."""
    ours, ref = tiny
    engine = make_engine(ours)
    planner = Planner(64)
    rng = np.random.default_rng(1)
    reqs = [Req(rng.integers(3, 49152, size=n).tolist()) for n in (9, 17, 30)]
    engine.launch(planner.plan([(r, len(r.prompt), True) for r in reqs]))
    launched_rows: list[list[Req]] = [list(reqs)]
    for i in range(8):
        # Rows in a different order each step, so carry_index is a real permutation.
        order = reqs[i % 3:] + reqs[: i % 3]
        prev = launched_rows[-1]
        carry = {row: prev.index(r) for row, r in enumerate(order)}
        engine.launch(planner.plan([(r, 1, True) for r in order], carry=carry))
        launched_rows.append(order)
        res = engine.collect()  # step N's tokens arrive after N+1 is already launched
        for r, tok in zip(launched_rows[-2], res.sampled, strict=True):
            r.out.append(int(tok))
    res = engine.collect()
    for r, tok in zip(launched_rows[-1], res.sampled, strict=True):
        r.out.append(int(tok))
    assert engine.num_in_flight == 0
    for r in reqs:
        assert len(r.out) == 9
        assert r.out == greedy_reference(ref, r.prompt, 9)


def test_bad_plans_are_refused_and_engine_stays_usable(tiny) -> None:
    ours, ref = tiny
    engine = make_engine(ours)
    planner = Planner(64)
    req = Req(list(range(100, 120)))
    good = planner.plan([(req, 20, True)])
    past_cache = good.append_blocks.copy()
    past_cache[1] = 10_000
    unknown_slot = good.rows.copy()
    unknown_slot[0] = (good.rows[0] + 1) % 8  # a slot no plan has started
    for bad in (dataclasses.replace(good, append_blocks=past_cache),
                dataclasses.replace(good, rows=unknown_slot),
                dataclasses.replace(good, append_blocks=good.append_blocks[:1], append_slots=good.append_slots[:1]),
                dataclasses.replace(good, carry_index=np.array([0], np.int32), carry_from_step=0)):
        with pytest.raises(WireError):  # nothing launched to carry from, a context past its blocks, ...
            engine.launch(bad)
    res = engine.execute(good)  # the refused plans changed nothing: the good one still applies
    assert int(res.sampled[0]) == greedy_reference(ref, req.prompt, 1)[0]
    with pytest.raises(WireError, match="still in use"):  # the slot now holds the request
        engine.launch(dataclasses.replace(planner.plan([(Req([5]), 1, True)]), new_slots=good.new_slots))


def test_embedded_smollm2_matches_generate() -> None:
    started = time.monotonic()
    model_dir = models.embedded_model_dir()
    ours = models.load(str(model_dir), "cpu", torch.float32)
    ref = models.load(str(model_dir), "cpu", torch.float32).model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    reqs = [Req(tok("The capital of France is")["input_ids"]),
            Req(tok("def fibonacci(n):")["input_ids"])]
    engine = make_engine(ours)
    planner = Planner(64)
    res = engine.execute(planner.plan([(r, len(r.prompt), True) for r in reqs]))
    for r, t in zip(reqs, res.sampled, strict=True):
        r.out.append(int(t))
    for _ in range(7):
        res = engine.execute(planner.plan([(r, 1, True) for r in reqs]))
        for r, t in zip(reqs, res.sampled, strict=True):
            r.out.append(int(t))
    for r in reqs:
        assert r.out == greedy_reference(ref, r.prompt, 8)
    assert "Paris" in tok.decode(reqs[0].out)
    assert time.monotonic() - started < 60


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_launch_path_never_syncs() -> None:
    """launch() issues a depth-2 pipeline without one host<->device synchronisation."""
    loaded = models.load("random:tiny-llama", "cuda", torch.float32, seed=0)
    engine = make_engine(loaded)
    planner = Planner(64)
    reqs = [Req(list(range(200, 200 + n))) for n in (3, 40)]
    for rows in ([(reqs[0], 3, True), (reqs[1], CHUNK, False)], [(reqs[0], 1, True), (reqs[1], 8, True)]):
        res = engine.execute(planner.plan(rows, num_logprobs=2))
        for (r, _, s), t in zip(rows, res.sampled, strict=True):
            if s:
                r.out.append(int(t))
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.launch(planner.plan([(r, 1, True) for r in reqs]))
        engine.launch(planner.plan([(r, 1, True) for r in reqs], carry={0: 0, 1: 1}))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    first, second = engine.collect(), engine.collect()
    assert (first.sampled >= 0).all() and (second.sampled >= 0).all()
    assert first.compute_ms > 0 and second.idle_gap_ms >= 0


def test_sliding_window_model_runs_within_its_window_and_is_refused_beyond(tmp_path) -> None:
    """A Mistral-style sliding window: refused with a clear reason when requests could outgrow it
    (the paged kernels attend to the whole context), served, matching generate, when --max-context
    keeps every request inside it. Gemma-2-style logit soft-capping is refused the same way."""
    mistral = {**presets.preset_config("tiny-llama"), "model_type": "mistral", "sliding_window": 48,
               "max_position_embeddings": 256}
    spec = tmp_path / "mistral.json"
    spec.write_text(json.dumps(mistral))
    with pytest.raises(ValueError, match=r"sliding-window attention \(48 tokens\).*--max-context 48 or less"):
        models.load(f"random:{spec}", "cpu", torch.float32)
    ours = models.load(f"random:{spec}", "cpu", torch.float32, max_context=48)
    ref = models.load(f"random:{spec}", "cpu", torch.float32, max_context=48).model
    engine = make_engine(ours)
    planner = Planner(64)
    req = Req(np.random.default_rng(2).integers(3, 49152, size=20).tolist())
    req.out.append(int(engine.execute(planner.plan([(req, len(req.prompt), True)])).sampled[0]))
    for _ in range(7):
        req.out.append(int(engine.execute(planner.plan([(req, 1, True)])).sampled[0]))
    assert req.out == greedy_reference(ref, req.prompt, 8)

    gemma2 = tmp_path / "gemma2.json"
    gemma2.write_text(json.dumps({**presets.preset_config("tiny-llama"), "model_type": "gemma2",
                                  "attn_logit_softcapping": 50.0, "sliding_window": 4096}))
    with pytest.raises(ValueError, match="soft-capping"):
        models.load(f"random:{gemma2}", "cpu", torch.float32)
