"""Installs the fused decoder forwards on a loaded transformers model, in place, at load time.

Owns which modules qualify and what replaces their forwards. The model's classes and its weights'
names stay as transformers wrote them (state_dict, tensor-parallel hooks and the attention
interface all still apply); only instance `forward`s change:
- attention: q/k/v projections merged into one GEMM (their weights concatenated once; the three
  parameters become views of the merged tensor, so memory does not grow), RoPE applied in place
  to the merged output in one launch, q/k/v handed to the attention interface as strided views;
- MLP: gate/up merged into one GEMM, SiLU x up in one launch, down_proj called as the module;
- decoder layer: input RMSNorm in one launch, the attention residual add fused with the
  post-attention RMSNorm, then the MLP and its residual add; with the kernels (CUDA), down_proj
  accumulates into the residual in place (`addmm_`, beta 1: no separate add launch) when it is a
  plain Linear without bias or hooks (a tensor-parallel down_proj has an all-reduce hook and keeps
  the module call and the separate add);
- the final norm: one launch.

With the kernels, o_proj and down_proj run with cuBLASLt preferred when the step has at most
LT_MAX_ROWS tokens (a setting read when the GEMM is issued, so a captured graph keeps the choice):
measured on an H200 (bench/linear_probe.py, 8B shapes, the 32 layers' GEMMs in one graph), 32 rows:
3.95 ms against 4.06 with cuBLAS for all; 128 rows: slower (4.63-4.65 against 4.51-4.58 ms).

Only classes whose eager forward these reproduce are touched (FUSABLE_LAYERS, the Llama pattern:
no q/k norms, rotate-half RoPE over the whole head, SiLU MLP, plain RMSNorm); anything else keeps
its own forward, so an unknown model runs unfused rather than wrong. Run after tensor-parallel
sharding: head counts come from the (local) weight shapes.
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Any

import torch
import torch.nn.functional as F

from worker_svc.fusion import ops

log = logging.getLogger("tandem.worker.fusion")

FUSABLE_LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"}
FUSABLE_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"}
LT_MAX_ROWS = 32


@contextlib.contextmanager
def _gemm_library(x: torch.Tensor, kernels: bool):
    """cuBLASLt preferred for the GEMMs issued inside, when `kernels`, `x` (the GEMM's input) is on
    CUDA and has at most LT_MAX_ROWS tokens."""
    if not (kernels and x.is_cuda) or x.numel() // x.shape[-1] > LT_MAX_ROWS:
        yield
        return
    backends = torch.backends.cuda
    before = backends.preferred_blas_library()
    backends.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        backends.preferred_blas_library(before)


def _plain_linear(lin: torch.nn.Module) -> bool:
    """A Linear whose call is exactly x @ W^T: no bias, no hooks (an all-reduce, say), no subclass."""
    return (type(lin) is torch.nn.Linear and lin.bias is None and not lin._forward_hooks
            and not lin._forward_pre_hooks)


def _eps(norm: torch.nn.Module) -> float:
    return float(norm.variance_epsilon)


def _merge(module: torch.nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenates the named Linear children's weights (and biases) along the output dimension and
    makes each child's parameters views of the result."""
    linears = [getattr(module, n) for n in names]
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        has_bias = [lin.bias is not None for lin in linears]
        bias = None
        if any(has_bias):
            bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
                              for lin in linears])
        start = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
            if bias is not None and lin.bias is not None:
                lin.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
            start += rows
    return weight, bias


def _interface(attn: torch.nn.Module) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = attn.config._attn_implementation
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    import sys

    return sys.modules[type(attn).__module__].eager_attention_forward  # "eager" is not registered


def _attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    assert kwargs.pop("cache", None) is None and kwargs.pop("past_key_values", None) is None, \
        "fused attention keeps no transformers cache (the paged cache is the attention's own)"
    batch, tokens = hidden_states.shape[:2]
    heads, kv_heads, dim = self._tandem_heads
    qkv = F.linear(hidden_states, self._tandem_qkv_weight, self._tandem_qkv_bias)
    flat = qkv.view(batch * tokens, -1)
    cos, sin = position_embeddings
    ops.rope_qk_(flat, cos.reshape(-1, dim), sin.reshape(-1, dim), heads, kv_heads, dim, self._tandem_kernels)
    q_end, k_end = heads * dim, (heads + kv_heads) * dim
    query = qkv[..., :q_end].unflatten(-1, (heads, dim)).transpose(1, 2)
    key = qkv[..., q_end:k_end].unflatten(-1, (kv_heads, dim)).transpose(1, 2)
    value = qkv[..., k_end:].unflatten(-1, (kv_heads, dim)).transpose(1, 2)
    extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) is not None else {}
    out, weights = _interface(self)(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                                    **extra, **kwargs)
    out = out.reshape(batch, tokens, -1).contiguous()
    with _gemm_library(out, self._tandem_kernels):
        return self.o_proj(out), weights


def _mlp_act(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate_up = F.linear(x, mlp._tandem_gate_up_weight, mlp._tandem_gate_up_bias)
    return ops.silu_mul(gate_up, mlp._tandem_kernels)


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    act = _mlp_act(self, x)
    with _gemm_library(act, self._tandem_kernels):
        return self.down_proj(act)


def _layer_forward(self: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: Any = None,
                   position_ids: Any = None, position_embeddings: Any = None, **kwargs: Any) -> torch.Tensor:
    kernels = self._tandem_kernels
    ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
    normed = ops.rms_norm(hidden_states, ln1.weight, _eps(ln1), kernels)
    attn, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
                             position_embeddings=position_embeddings, **kwargs)
    normed, hidden_states = ops.add_rms_norm(attn, hidden_states, ln2.weight, _eps(ln2), kernels)
    mlp = self.mlp
    if not (kernels and _plain_linear(mlp.down_proj) and not mlp._forward_hooks and not mlp._forward_pre_hooks):
        return hidden_states + mlp(normed)
    # hidden_states is add_rms_norm's own new sum, read by nothing else: the down GEMM adds into it.
    act = _mlp_act(mlp, normed)
    total = hidden_states.view(-1, hidden_states.shape[-1])
    with _gemm_library(act, kernels):
        total.addmm_(act.view(-1, act.shape[-1]), mlp.down_proj.weight.t())
    return hidden_states


def _norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm(hidden_states, self.weight, _eps(self), self._tandem_kernels)


def _refusal(layer: torch.nn.Module) -> str | None:
    """Why this decoder layer's forward cannot be replaced, or None."""
    if type(layer).__name__ not in FUSABLE_LAYERS:
        return f"{type(layer).__name__} is not a known decoder layer"
    attn, mlp = layer.self_attn, layer.mlp
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
        return "q/k norms"
    if getattr(mlp.config, "hidden_act", None) != "silu":
        return f"activation {getattr(mlp.config, 'hidden_act', None)!r}"
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if type(norm).__name__ not in FUSABLE_NORMS:
            return f"norm {type(norm).__name__}"
    rope = getattr(attn.config, "partial_rotary_factor", 1.0)
    if rope not in (None, 1.0):
        return "partial RoPE"
    return None


def apply(model: torch.nn.Module, kernels: bool | None = None) -> int:
    """Installs the fused forwards on every qualifying decoder layer of `model`; returns how many.
    `kernels`: Triton kernels (default: when the model is on CUDA) or the PyTorch formulas."""
    if kernels is None:
        kernels = next(model.parameters()).is_cuda
    fused = 0
    for name, layer in model.named_modules():
        if not (hasattr(layer, "self_attn") and hasattr(layer, "mlp")):
            continue
        why = _refusal(layer)
        if why is not None:
            log.info("%s stays unfused: %s", name, why)
            continue
        attn, mlp = layer.self_attn, layer.mlp
        dim = attn.head_dim
        attn._tandem_heads = (attn.q_proj.weight.shape[0] // dim, attn.k_proj.weight.shape[0] // dim, dim)
        attn._tandem_qkv_weight, attn._tandem_qkv_bias = _merge(attn, ("q_proj", "k_proj", "v_proj"))
        mlp._tandem_gate_up_weight, mlp._tandem_gate_up_bias = _merge(mlp, ("gate_proj", "up_proj"))
        for module, forward in ((attn, _attention_forward), (mlp, _mlp_forward), (layer, _layer_forward)):
            module._tandem_kernels = kernels
            module.forward = types.MethodType(forward, module)
        fused += 1
    if fused:
        for module in model.modules():  # the final norm (the layers' own norms are called by name above)
            if type(module).__name__ in FUSABLE_NORMS and getattr(module, "_tandem_kernels", None) is None:
                module._tandem_kernels = kernels
                module.forward = types.MethodType(_norm_forward, module)
    log.info("fused %d decoder layers (%s)", fused, "Triton kernels" if kernels else "PyTorch formulas")
    return fused


def matmul_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weight matrices one forward multiplies by, merged ones as one: what a GEMM-only timing
    of the step replays (bench floor)."""
    out: list[torch.Tensor] = []
    merged: set[int] = set()
    for module in model.modules():
        for attr in ("_tandem_qkv_weight", "_tandem_gate_up_weight"):
            w = getattr(module, attr, None)
            if w is not None:
                out.append(w)
                for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                    if hasattr(module, name):
                        merged.add(id(getattr(module, name)))
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in merged:
            out.append(module.weight)
    return out


def lt_weights(model: torch.nn.Module) -> set[int]:
    """ids of the weights the fused forward multiplies with cuBLASLt preferred at few rows (o_proj,
    down_proj of fused layers): what bench floor's GEMM-only timing does alike."""
    out: set[int] = set()
    for module in model.modules():
        if getattr(module, "_tandem_qkv_weight", None) is not None and module._tandem_kernels:
            out.add(id(module.o_proj.weight))
        if getattr(module, "_tandem_gate_up_weight", None) is not None and module._tandem_kernels:
            out.add(id(module.down_proj.weight))
    return out
