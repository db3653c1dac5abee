"""Tensor parallelism: the worker group's torch.distributed process group and the sharding of a model.

Owns the rendezvous (torchrun's conventions: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, from
the environment, so a group can span hosts), the refusal of a size the model cannot be split by, and the
split itself. Which layers split how comes from the model's own tensor-parallel plan (transformers'
`base_model_tp_plan`: "colwise" for q/k/v and gate/up, "rowwise" for o and down); the model code is
not modified: the linear layers keep their classes with sliced weights, and a forward hook on each
row-parallel layer all-reduces its partial sums (one after attention, one after the MLP). Each rank
then holds its own attention and KV heads, so the KV cache (sized from the config) holds only those.
The embedding, the norms and the LM head are replicated: every rank computes the same logits, and
samples the same tokens from them (the all-reduce gives every rank the same sums).
"""

from __future__ import annotations

import datetime
import fnmatch
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("tandem.worker.tp")

# A collective that waits this long fails (a follower idles at most HEARTBEAT_S between the leader's
# messages: group_link.py). A dead peer is noticed at once anyway (its sockets close), a hung one by
# the worker's own step watchdog (--hang-timeout).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class GroupInfo:
    rank: int
    world_size: int
    local_rank: int
    master: str  # host:port of the rendezvous

    @property
    def leader(self) -> bool:
        return self.rank == 0


def group_from_env(tensor_parallel_size: int, env: dict[str, str] | None = None) -> GroupInfo | None:
    """The rank's place in its group from torchrun's variables; None for a group of one."""
    env = dict(os.environ if env is None else env)
    if tensor_parallel_size <= 1:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in env]
    if missing:
        raise ValueError(f"--tensor-parallel-size {tensor_parallel_size} needs {', '.join(missing)} in the "
                         f"environment (torchrun's conventions; `tandem serve` sets them)")
    world = int(env.get("WORLD_SIZE", tensor_parallel_size))
    if world != tensor_parallel_size:
        raise ValueError(f"WORLD_SIZE={world} but --tensor-parallel-size {tensor_parallel_size}")
    rank = int(env["RANK"])
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} outside a group of {world}")
    return GroupInfo(rank, world, int(env.get("LOCAL_RANK", rank)), f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}")


def init_group(info: GroupInfo, device: str) -> Any:
    """Joins the group (NCCL on CUDA, gloo on CPU); returns the gloo group the plans travel on."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    host, port = info.master.rsplit(":", 1)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=info.rank,
                            world_size=info.world_size, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)  # CPU tensors, whatever the device
    log.info("rank %d of %d joined the group at %s (%s)", info.rank, info.world_size, info.master, backend)
    return control


def group_min(value: int, control: Any) -> int:
    """The least `value` over the group's ranks (the KV blocks every rank can hold)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control)
    return int(t.item())


def check_divisible(config: Any, size: int) -> None:
    """Refuses a size that does not split the model's heads (and MLP) evenly, naming the counts."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None)
    if heads % size or kv_heads % size or (inter is not None and inter % size):
        raise ValueError(
            f"--tensor-parallel-size {size} does not divide the model's heads: {heads} attention heads, "
            f"{kv_heads} KV heads" + (f", MLP intermediate size {inter}" if inter is not None else "")
            + "; choose a size that divides all of them")


def shard_model(model: Any, rank: int, size: int) -> None:
    """Slices `model`'s linear layers in place by its tensor-parallel plan and hooks the all-reduces."""
    config = model.config.get_text_config()
    check_divisible(config, size)
    plan = getattr(config, "base_model_tp_plan", None) or {}
    if not plan:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (base_model_tp_plan): "
                         f"Tandem splits only models whose plan says how")
    unknown = sorted({style for style in plan.values() if style not in ("colwise", "rowwise")})
    if unknown:
        raise ValueError(f"{type(model).__name__}'s tensor-parallel plan uses {', '.join(unknown)}: "
                         f"Tandem splits colwise and rowwise layers only")
    base = model.base_model
    done = 0
    for name, module in base.named_modules():
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if style is None:
            continue
        assert isinstance(module, torch.nn.Linear), f"{name}: a {style} layer that is not nn.Linear"
        (_colwise if style == "colwise" else _rowwise)(module, rank, size)
        done += 1
    assert done > 0, "the tensor-parallel plan matched no layer"
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    # What the KV cache and the attention buffers read: this rank's heads (head_dim made explicit first,
    # since a config without it derives it from the whole model's head count).
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    config.num_attention_heads, config.num_key_value_heads = heads // size, kv_heads // size
    log.info("rank %d: %d layers split %d ways (%d attention heads, %d KV heads here)", rank, done, size,
             config.num_attention_heads, config.num_key_value_heads)


def _colwise(layer: torch.nn.Linear, rank: int, size: int) -> None:
    part = layer.out_features // size
    rows = slice(rank * part, (rank + 1) * part)
    layer.weight = torch.nn.Parameter(layer.weight.data[rows].clone(), requires_grad=False)
    if layer.bias is not None:
        layer.bias = torch.nn.Parameter(layer.bias.data[rows].clone(), requires_grad=False)
    layer.out_features = part


def _rowwise(layer: torch.nn.Linear, rank: int, size: int) -> None:
    part = layer.in_features // size
    layer.weight = torch.nn.Parameter(layer.weight.data[:, rank * part:(rank + 1) * part].clone(),
                                      requires_grad=False)
    if layer.bias is not None and rank != 0:  # the sum over ranks must add the bias once
        layer.bias = torch.nn.Parameter(torch.zeros_like(layer.bias.data), requires_grad=False)
    layer.in_features = part
    layer.register_forward_hook(_all_reduce_output)


def _all_reduce_output(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output
