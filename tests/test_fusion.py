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


@pytest.mark.skipif(not KERNELS_HERE, reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_kernels_match_the_formulas(tokens: int, dtype: torch.dtype) -> None:
    """In bf16 the kernels round where the formulas round: equal up to a unit or two in the last place
    (RMSNorm's mean is summed in another order and Triton's exp, rsqrt and division are not
    torch's, so a rounded intermediate can differ by one unit, and the product it feeds by two)."""
    pytest.importorskip("triton")
    from worker_svc.fusion import kernels, ops

    gen = torch.Generator(device=DEVICE).manual_seed(tokens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)

    x, res, w = randn(tokens, 96), randn(tokens, 96), randn(96)
    tol = {"rtol": 2**-5, "atol": 1e-5} if dtype == torch.bfloat16 else {}

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")
    close(kernels.rms_norm(x, w, 1e-5), ops.ref_rms_norm(x, w, 1e-5), "rms_norm")
    normed, total = kernels.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(total, x + res, rtol=0, atol=0)
    close(normed, ops.ref_rms_norm(x + res, w, 1e-5), "add_rms_norm")
    gu = randn(tokens, 2 * 1500)  # more than one block of columns
    close(kernels.silu_mul(gu), ops.silu_mul(gu, kernels=False), "silu_mul")
    heads, kv_heads, dim = 4, 2, 32
    qkv, cos, sin = randn(tokens, (heads + 2 * kv_heads) * dim), randn(tokens, dim), randn(tokens, dim)
    want = qkv.clone()
    ops.rope_qk_(want, cos, sin, heads, kv_heads, dim, kernels=False)
    qkv_in, exact = qkv.clone(), qkv.clone().float()
    ops.rope_qk_(exact, cos.float(), sin.float(), heads, kv_heads, dim, kernels=False)
    kernels.rope_qk_(qkv, cos, sin, heads, kv_heads, dim)
    if dtype == torch.bfloat16:
        # Near a cancellation the kernel and eager differ by a unit of RoPE's products, not of the
        # result (measured on an H200): both must be within eager's own error bound, a unit of each
        # product plus half a unit of the sum, from the exact rotation of the same bf16 inputs.
        half = dim // 2
        mag = exact.new_zeros(exact.shape).unflatten(-1, (-1, dim))
        x = qkv_in.float().unflatten(-1, (-1, dim))
        c, s_ = cos.float()[:, None, :], sin.float()[:, None, :]
        mag[..., :half] = (x[..., :half] * c[..., :half]).abs() + (x[..., half:] * s_[..., :half]).abs()
        mag[..., half:] = (x[..., half:] * c[..., half:]).abs() + (x[..., :half] * s_[..., half:]).abs()
        bound = 2**-7 * mag.flatten(-2) + 2**-8 * exact.abs() + 1e-6
        rot = slice(0, (heads + kv_heads) * dim)  # the value heads are untouched: compared exactly below
        assert ((want.float() - exact).abs()[:, rot] <= bound[:, rot]).all(), "eager rope outside its bound"
        assert ((qkv.float() - exact).abs()[:, rot] <= bound[:, rot]).all(), "rope"
        assert torch.equal(qkv[:, rot.stop :], qkv_in[:, rot.stop :]), "rope touched the value heads"
    else:
        close(qkv, want, "rope")


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
