"""The fused decoder forwards (worker_svc/fusion) against the model as transformers wrote it.

On the CPU, in float32: the fused forwards with the PyTorch formulas, and with the Triton kernels in
Triton's interpreter (TRITON_INTERPRET=1, set by conftest where no GPU exists; on a GPU the kernels
run for real), through transformers' own attention and through the paged attention with a packed
multi-row step. Also: merging leaves parameters, their names and their bytes as they were, and the
physical floor's byte accounting (bench/floor_parts.py) counts each weight once.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from worker_svc import fusion  # noqa: E402
from worker_svc.attention import STEP_KWARG, PagedStep, install  # noqa: E402
from worker_svc.kv_cache import KVCacheConfig, PagedKVCache  # noqa: E402
from worker_svc.models import load  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_HERE = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
SPECS = ("random:tiny-llama", "random:tiny-qwen2")


def _pair(spec: str, kernels: bool):
    plain = load(spec, device=DEVICE, skip_tokenizer=True)
    fused = load(spec, device=DEVICE, skip_tokenizer=True)
    assert fusion.apply(fused.model, kernels=kernels) == plain.config.num_hidden_layers
    return plain, fused


def _kernel_modes() -> list[bool]:
    if not KERNELS_HERE:
        return [False]
    pytest.importorskip("triton")
    return [False, True]


@pytest.mark.parametrize("kernels", _kernel_modes())
@pytest.mark.parametrize("spec", SPECS)
def test_fused_matches_unfused_with_transformers_attention(spec: str, kernels: bool) -> None:
    plain, fused = _pair(spec, kernels)
    ids = torch.randint(3, 5000, (1, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        want = plain.model(input_ids=ids, use_cache=False).logits
        got = fused.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", _kernel_modes())
@pytest.mark.parametrize("spec", SPECS)
def test_fused_matches_unfused_through_paged_attention(spec: str, kernels: bool) -> None:
    """Three rows packed in one step (a 5-token prefill, two single tokens over earlier context): q, k
    and v reach the paged attention as strided views of the merged projection."""
    plain, fused = _pair(spec, kernels)
    cfg = plain.config
    lens, queries = [5, 12, 7], [5, 1, 1]
    block, blocks_per_row = 4, 4
    tables = np.arange(len(lens) * blocks_per_row, dtype=np.int32).reshape(len(lens), blocks_per_row)
    positions = np.concatenate([np.arange(lens[r] - queries[r], lens[r]) for r in range(len(lens))])
    # Each row's blocks are contiguous: position p of row r sits at slot tables[r, 0] * block + p.
    row_of = np.repeat(np.arange(len(lens)), queries)
    slot_mapping = (tables[row_of, 0] * block + positions).astype(np.int32)
    query_start = np.concatenate([[0], np.cumsum(queries)]).astype(np.int32)
    ids = torch.randint(3, 5000, (1, int(query_start[-1])), generator=torch.Generator().manual_seed(2))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_cfg = KVCacheConfig(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, block, 16, torch.float32, DEVICE)
    cache = PagedKVCache(kv_cfg)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    for layer in range(cfg.num_hidden_layers):  # earlier context: the same random K/V for both models
        cache.k[layer].normal_(generator=gen)
        cache.v[layer].normal_(generator=gen)
    logits = []
    for loaded in (plain, fused):
        install(loaded.model)
        own = PagedKVCache(kv_cfg)
        for layer in range(cfg.num_hidden_layers):
            own.k[layer].copy_(cache.k[layer])
            own.v[layer].copy_(cache.v[layer])
        step = PagedStep.from_arrays(own, slot_mapping, tables, query_start, np.array(lens, np.int32))
        with torch.no_grad():
            out = loaded.model(input_ids=ids.to(DEVICE), position_ids=torch.as_tensor(positions)[None].to(DEVICE),
                               use_cache=False, **{STEP_KWARG: step})
        logits.append(out.logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


# bf16 in the interpreter is not exercised (as in test_kernels.py); on a GPU it is.
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


U_BF16 = 2.0**-8  # bf16's unit roundoff: rounding to nearest errs by at most 2^-8 of the value


@pytest.mark.skipif(not KERNELS_HERE, reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_kernels_match_the_formulas(tokens: int, dtype: torch.dtype) -> None:
    """float32: the kernels equal the formulas to float32 rounding. bf16: each kernel's output is
    within the a-priori rounding bound of the eager formula from a float64 oracle computed on the
    same bf16 inputs (u = 2^-8 per rounding, counted below), and the eager formula itself must be
    within that bound (a check of the oracle); RoPE, which only multiplies and adds, must equal
    eager bit for bit (the kernels launch without FMA contraction; worker_svc/fusion/kernels.py)."""
    pytest.importorskip("triton")
    from worker_svc.fusion import kernels, ops

    gen = torch.Generator(device=DEVICE).manual_seed(tokens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)

    x, res, w = randn(tokens, 96), randn(tokens, 96), randn(96)
    gu = randn(tokens, 2 * 1500)  # more than one block of columns
    heads, kv_heads, dim = 4, 2, 32
    qkv, cos, sin = randn(tokens, (heads + 2 * kv_heads) * dim), randn(tokens, dim), randn(tokens, dim)
    got_norm = kernels.rms_norm(x, w, 1e-5)
    normed, total = kernels.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(total, x + res, rtol=0, atol=0)  # one rounding of the sum, as eager's
    got_act = kernels.silu_mul(gu)
    want_rope = qkv.clone()
    ops.rope_qk_(want_rope, cos, sin, heads, kv_heads, dim, kernels=False)
    got_rope = qkv.clone()
    kernels.rope_qk_(got_rope, cos, sin, heads, kv_heads, dim)
    rot = slice(0, (heads + kv_heads) * dim)  # the value heads are untouched
    assert torch.equal(got_rope[:, rot.stop :], qkv[:, rot.stop :]), "rope touched the value heads"
    if dtype == torch.float32:
        torch.testing.assert_close(got_norm, ops.ref_rms_norm(x, w, 1e-5))
        torch.testing.assert_close(normed, ops.ref_rms_norm(x + res, w, 1e-5))
        torch.testing.assert_close(got_act, ops.silu_mul(gu, kernels=False))
        torch.testing.assert_close(got_rope, want_rope)
        return

    def within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str) -> None:
        err = (got.double() - exact).abs()
        bad = ~(err <= bound)  # NaN fails
        worst = float((err / bound).max())
        assert not bad.any(), f"{what}: {int(bad.sum())} elements outside the bound, worst {worst:.2f}x"

    # RMSNorm: eager rounds the normalised value, then its product with the weight: two roundings,
    # |err| <= (2u + u^2) |w * n|; float32 statistics (rsqrt, the mean's summation order) add < 1e-5.
    def rms_exact(v: torch.Tensor) -> torch.Tensor:
        v64 = v.double()
        return w.double() * v64 * torch.rsqrt(v64.pow(2).mean(-1, keepdim=True) + 1e-5)

    for got, src, what in ((got_norm, x, "rms_norm"), (normed, total, "add_rms_norm")):
        exact = rms_exact(src)
        bound = (2 * U_BF16 + U_BF16**2 + 1e-5) * exact.abs()
        within(ops.ref_rms_norm(src, w, 1e-5), exact, bound, f"eager {what}")
        within(got, exact, bound, what)
    # SiLU x up: SiLU rounded, then the product: two roundings; float32 exp/division add < 1e-5
    # (Triton's exp is an ex2.approx, relative error ~2^-22).
    g64, u64 = gu.double().chunk(2, dim=-1)
    exact = g64 * torch.sigmoid(g64) * u64
    bound = (2 * U_BF16 + U_BF16**2 + 1e-5) * exact.abs()
    within(ops.silu_mul(gu, kernels=False), exact, bound, "eager silu_mul")
    within(got_act, exact, bound, "silu_mul")
    # RoPE: each of the two products rounded, then their sum: |err| <= u (1 + u)(|p1| + |p2|) + u |exact|.
    exact = qkv.double().clone()
    ops.rope_qk_(exact, cos.double(), sin.double(), heads, kv_heads, dim, kernels=False)
    half = dim // 2
    xs = qkv.double().unflatten(-1, (-1, dim))
    c, s_ = cos.double()[:, None, :], sin.double()[:, None, :]
    mag = xs.new_zeros(xs.shape)
    mag[..., :half] = (xs[..., :half] * c[..., :half]).abs() + (xs[..., half:] * s_[..., :half]).abs()
    mag[..., half:] = (xs[..., half:] * c[..., half:]).abs() + (xs[..., :half] * s_[..., half:]).abs()
    bound = U_BF16 * (1 + U_BF16) * mag.flatten(-2) + U_BF16 * exact.abs()
    within(want_rope[:, rot], exact[:, rot], bound[:, rot], "eager rope")
    within(got_rope[:, rot], exact[:, rot], bound[:, rot], "rope")
    assert torch.equal(got_rope, want_rope), f"rope differs from eager in {int((got_rope != want_rope).sum())} elements"


def test_merging_keeps_parameters_and_bytes() -> None:
    from bench.floor_parts import weight_bytes_per_step

    plain, fused = _pair("random:tiny-llama", kernels=False)
    want, got = plain.model.state_dict(), fused.model.state_dict()
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    cfg = plain.config
    embedding = cfg.vocab_size * cfg.hidden_size * 4
    total = sum(p.numel() * 4 for p in plain.model.parameters())
    assert weight_bytes_per_step(plain.model, 3) == total - embedding + 3 * cfg.hidden_size * 4
    assert weight_bytes_per_step(fused.model, 3) == weight_bytes_per_step(plain.model, 3)
    layers = cfg.num_hidden_layers
    assert len(fusion.matmul_weights(plain.model)) == 7 * layers + 1
    merged = fusion.matmul_weights(fused.model)
    assert len(merged) == 4 * layers + 1
    assert sum(w.numel() for w in merged) == sum(w.numel() for w in fusion.matmul_weights(plain.model))


def test_unknown_layers_stay_unfused() -> None:
    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn, self.mlp = torch.nn.Identity(), torch.nn.Identity()

    model = torch.nn.Sequential(Layer(), torch.nn.Linear(2, 2))
    forward = model[0].forward
    assert fusion.apply(model, kernels=False) == 0
    assert model[0].forward == forward


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels run on a GPU")
@pytest.mark.parametrize("spec", SPECS)
def test_bf16_fused_is_no_further_from_float32_than_unfused(spec: str) -> None:
    """bf16 fused and unfused differ by rounding; neither may be much further from the float32 model
    with the same (bf16) weights than the other."""
    plain = load(spec, device=DEVICE, dtype=torch.bfloat16, skip_tokenizer=True)
    fused = load(spec, device=DEVICE, dtype=torch.bfloat16, skip_tokenizer=True)
    exact = load(spec, device=DEVICE, dtype=torch.float32, skip_tokenizer=True)
    with torch.no_grad():
        for wide, narrow in zip(exact.model.parameters(), plain.model.parameters(), strict=True):
            wide.copy_(narrow)
    fusion.apply(fused.model)
    ids = torch.randint(3, 5000, (1, 33), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        want = exact.model(input_ids=ids, use_cache=False).logits.float()
        errs = [(m.model(input_ids=ids, use_cache=False).logits.float() - want).abs().max().item()
                for m in (plain, fused)]
    assert errs[1] <= 2 * errs[0] + 1e-2, errs


def test_the_worker_fuses_on_cuda_unless_told_otherwise(monkeypatch) -> None:
    """`--fuse` / `--no-fuse` win; without either, CUDA fuses and the CPU keeps the oracle; the
    TANDEM_FUSE environment twin reads like the flag."""
    from worker_svc.__main__ import build_parser, fuse_wanted

    monkeypatch.delenv("TANDEM_FUSE", raising=False)
    unset = build_parser().parse_args([]).fuse
    assert unset is None
    assert fuse_wanted(unset, "cuda") and not fuse_wanted(unset, "cpu")
    assert fuse_wanted(build_parser().parse_args(["--fuse"]).fuse, "cpu")
    assert not fuse_wanted(build_parser().parse_args(["--no-fuse"]).fuse, "cuda")
    for raw, want in (("0", False), ("1", True)):
        monkeypatch.setenv("TANDEM_FUSE", raw)
        assert build_parser().parse_args([]).fuse is want
        assert build_parser().parse_args(["--fuse" if not want else "--no-fuse"]).fuse is (not want)


def test_a_worker_started_with_fuse_serves_what_the_unfused_one_does(servers) -> None:
    """Through the real processes: a CPU worker given --fuse installs the formulas on every layer (its
    log says so, the default one's does not) and, in float32, answers greedy requests token for token
    as the unfused worker does (the formulas differ from transformers' ops by float32 rounding only,
    far below these random logits' gaps over 16 tokens; tests above bound the logits themselves)."""
    from client import TandemClient
    from tests.conftest import TINY_WORKER_ARGS

    # CPU workers even where TANDEM_TEST_DEVICE=cuda: the comparison is of float32 CPU workers.
    cpu = ("--device", "cpu", *TINY_WORKER_ARGS[2:])
    assert TINY_WORKER_ARGS[0] == "--device"
    tiny, fused = servers.get(worker_args=cpu), servers.get(worker_args=(*cpu, "--fuse"))
    assert "fused 4 decoder layers (PyTorch formulas)" in fused.log_text("worker")
    assert "fused 4 decoder layers" not in tiny.log_text("worker")
    prompts = [[5 + i, 17, 3 * i + 1, 40, 9] for i in range(4)]
    answers = []
    for server in (tiny, fused):
        with TandemClient(server.address) as c:
            answers.append([c.generate(token_ids=p, max_new_tokens=16, ignore_eos=True, temperature=0).token_ids
                            for p in prompts])
    assert answers[0] == answers[1]
    assert all(len(a) == 16 for a in answers[1])
