"""How close is a decode step to the hardware floor? Per shape, batch and context, in one run.

Owns the measurement of the GPU fast-path issue:
- `step_ms`: the worker engine's real decode step (CUDA graph replay, sampling, copies) with B rows
  of C-token context, in steady state at pipeline depth 2 (two steps in flight): wall time per step;
- `physical_floor_ms` = (weight bytes streamed + KV bytes read) / `hbm_gb_s`: every weight once (the
  input embedding only for the rows looked up), every row's K and V over its context, at the
  bandwidth of a device-to-device copy measured in the run (bench/floor_parts.py);
- `model_floor_ms` = `forward_nokv_ms` + KV bytes / `hbm_gb_s`: the same graph-captured forward with
  every row's context 1 token (the model as it runs, KV traffic nil) plus the KV read;
- a breakdown of the step: `forward_ms` (a graph of the forward alone at context C), `attention_ms`
  (KV store + decode kernel, every layer, one graph), `linear_ms` (every GEMM of the forward alone,
  one graph), `rest_ms` (forward minus both: norms, RoPE, activations, residual adds, copies),
  `sampling_ms` (the step's device time minus the forward) and `gap_ms` (wall minus device time);
- `--fusion off on`: the grid with the model as loaded, then with worker_svc/fusion installed, in one
  process, and `fusion_check`: fused against unfused logits of one prompt (transformers' SDPA) and
  the first decode step's greedy tokens and logprobs of every grid point;
- with `--profile`, kernel time inside one graph replay grouped into linear / attention / other.

The KV cache is never prefilled (zeros, then whatever the attention timing stores): timing does not
depend on the values.

    python -m bench floor [--model random:llama-3.1-8b] [--batches 32 128 256] [--fusion off on] [--json ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
from datetime import UTC, datetime

import numpy as np
import torch
from tandem.wire import StepPlan

from bench.decode_state import decode_plan, fixed_context_rows
from bench.floor_parts import graph_ms, linear_ms, logits_check, physical_floor_ms, weight_bytes_per_step
from worker_svc.graphs.cuda_graphs import decode_layout, pad_decode_batch

# (batch, contexts): what fits next to 16 GB of 8B weights on an 80 GB GPU.
DEFAULT_GRID = {32: (1024, 4096, 8192), 128: (1024,), 256: (1024,)}


def _events_ms(fn, reps: int, stream: torch.cuda.Stream) -> float:
    """Mean device time of `fn` over `reps` back-to-back calls on `stream`."""
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps


def hbm_bandwidth_gb_s(gib: int = 4) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second)."""
    buffers = [torch.empty(gib << 30, dtype=torch.uint8, device="cuda") for _ in range(2)]
    ms = _events_ms(lambda: buffers[1].copy_(buffers[0]), 10, torch.cuda.current_stream())
    return 2 * (gib << 30) / (ms / 1000) / 1e9


def step_wall_ms(engine, plan_for, steps: int) -> tuple[float, float]:
    """(wall ms per step, device ms per step) with two steps in flight, as the async loop runs."""
    import time

    for i in range(4):
        engine.execute(plan_for(i))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.launch(plan_for(0))
    device = 0.0
    for i in range(1, steps):
        engine.launch(plan_for(i))
        device += engine.collect().compute_ms
    device += engine.collect().compute_ms
    return 1000 * (time.perf_counter() - t0) / steps, device / steps


def forward_ms(engine, plan: StepPlan, reps: int = 20) -> float:
    """Device time of a CUDA graph of the model forward alone (no sampling) on `plan`'s inputs,
    captured here the way the engine captures its decode graphs."""
    batch = engine.check_plan(plan)
    bucket = engine.graphs.bucket_for(batch)
    slot, other = engine.slots
    width = engine.limits.max_blocks_per_row
    layout = decode_layout(bucket, width)
    inputs = slot.load(pad_decode_batch(batch, bucket), layout)
    step = engine.paged_step(inputs, layout)
    stream = engine.sync.compute_stream
    stream.wait_event(slot.h2d_done)
    with torch.inference_mode():
        with torch.cuda.stream(stream):
            engine.forward(inputs, step, other, False, 0)  # warm-up outside the capture
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            engine.forward(inputs, step, other, False, 0)
        ms = _events_ms(graph.replay, reps, stream)
    slot.in_use = False
    del graph
    return ms


def attention_ms(engine, rows: int, context: int) -> float:
    """KV store + paged decode for every layer at this batch and context, as one CUDA graph's replay
    (eagerly, the launches of 32 layers would outlast the kernels at short contexts)."""
    from worker_svc.kernels.triton_attention import paged_decode, store_kv

    cfg = engine.cache.cfg
    batch = engine.check_plan(decode_plan(engine, 0, rows, context))
    dev = lambda a: torch.as_tensor(a, device="cuda")  # noqa: E731
    kv_lens, slots, every = dev(batch.kv_lens), dev(batch.slot_mapping), dev(batch.rows)
    heads = engine.loaded.config.num_attention_heads
    q = torch.randn(rows, heads, cfg.head_dim, dtype=cfg.dtype, device="cuda")
    kv = torch.randn(rows, cfg.kv_heads, cfg.head_dim, dtype=cfg.dtype, device="cuda")
    out = torch.empty_like(q)
    scale = cfg.head_dim**-0.5
    torch.cuda.synchronize()  # q and kv come from the default stream; the graph runs on the compute stream

    def all_layers() -> None:
        for layer in range(cfg.num_layers):
            store_kv(kv, kv, engine.cache.k[layer], engine.cache.v[layer], slots)
            paged_decode(q, engine.cache.k[layer], engine.cache.v[layer], out, engine.block_table, every, kv_lens,
                         every, every, scale)

    return graph_ms(all_layers, engine.sync.compute_stream)


def profile_replay(engine, plan: StepPlan) -> dict[str, float]:
    """Kernel time inside a forward graph's replays, by kind, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward_ms(engine, plan, reps)
        torch.cuda.synchronize()
    kinds = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        name = ev.key.lower()
        us = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
        if ev.device_type != torch.autograd.DeviceType.CUDA and "memcpy" not in name:
            kind = None
        elif any(s in name for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90")):
            kind = "linear"
        elif any(s in name for s in ("_decode_kernel", "_merge_kernel", "_store_kv", "_prefill_kernel")):
            kind = "attention"
        else:
            kind = "other"
        if kind:
            kinds[kind] += us / 1000 / (reps + 2)  # plus the eager warm-up and _events_ms's warm-up replay
    return kinds


def check_prompt(loaded, tokens: int = 64) -> torch.Tensor:
    """Logits [tokens, V] of one fixed prompt through the model with transformers' own attention
    (SDPA), eagerly: what the fused forwards are checked against."""
    ids = torch.randint(3, loaded.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    loaded.model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        return loaded.model(input_ids=ids.cuda(), use_cache=False).logits[0].float()


def run_grid(loaded, args, record: dict, fused: str, outputs: dict) -> None:
    """Every (batch, context) of the run with the model as it is now; entries tagged with `fused`."""
    from worker_svc import fusion
    from worker_svc.runner import Engine, EngineConfig

    weights, lt = fusion.matmul_weights(loaded.model), fusion.lt_weights(loaded.model)
    for batch in args.batches:
        contexts = args.contexts or DEFAULT_GRID.get(batch, (1024,))
        blocks = batch * -(-max(contexts) // EngineConfig.block_size) + 16
        engine = Engine(loaded, EngineConfig(num_blocks=blocks, max_num_rows=batch, max_num_tokens=max(512, batch)),
                        "cuda")
        cfg = engine.cache.cfg
        fixed_context_rows(engine, batch, 1)
        nokv = forward_ms(engine, decode_plan(engine, 0, batch, 1))
        gemm = linear_ms(weights, batch, engine.sync.compute_stream, lt)
        wbytes = weight_bytes_per_step(loaded.model, batch)
        for context in contexts:
            fixed_context_rows(engine, batch, context)
            plan_for = lambda i, e=engine, b=batch, c=context: decode_plan(e, i, b, c)  # noqa: E731
            first = engine.execute(plan_for(0))  # from a zero cache: compared across fusion modes
            logprob = first.logprob if first.logprob is not None else np.zeros(batch, np.float32)
            outputs[(fused, batch, context)] = (np.array(first.sampled[:batch]), np.array(logprob[:batch]))
            wall, device = step_wall_ms(engine, plan_for, args.steps)
            forward = forward_ms(engine, plan_for(0))
            attn = attention_ms(engine, batch, context)
            kv_bytes = batch * context * cfg.bytes_per_block / cfg.block_size
            model_floor = nokv + kv_bytes / (record["hbm_gb_s"] * 1e9) * 1000
            physical = physical_floor_ms(wbytes, kv_bytes, record["hbm_gb_s"])
            entry = {
                "fused": fused, "batch": batch, "context": context, "step_ms": wall,
                "physical_floor_ms": physical, "step_over_physical": wall / physical,
                "model_floor_ms": model_floor, "step_over_model": wall / model_floor,
                "weight_bytes": wbytes, "kv_bytes": kv_bytes, "forward_nokv_ms": nokv, "device_ms": device,
                "forward_ms": forward, "attention_ms": attn, "linear_ms": gemm,
                "linear_gb_s": sum(w.numel() * w.element_size() for w in weights) / gemm / 1e6,
                "rest_ms": forward - attn - gemm, "sampling_ms": device - forward, "gap_ms": wall - device,
            }
            if args.profile and context == contexts[-1]:
                try:
                    entry["graph_kernels_ms"] = profile_replay(engine, plan_for(0))
                except Exception as e:  # the profile is an extra: its failure must not lose the run
                    entry["graph_kernels_ms"] = f"{type(e).__name__}: {e}"
            record["entries"].append(entry)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def compare_modes(outputs: dict) -> list[dict]:
    """Per (batch, context) run in both modes: the first step's greedy tokens and logprobs compared."""
    out = []
    for (mode, batch, context), (tokens, logprob) in outputs.items():
        if mode != "off" or ("on", batch, context) not in outputs:
            continue
        tokens_on, logprob_on = outputs[("on", batch, context)]
        out.append({"batch": batch, "context": context, "tokens_agree": float((tokens == tokens_on).mean()),
                    "max_logprob_diff": float(abs(logprob - logprob_on).max())})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_GRID))
    p.add_argument("--contexts", type=int, nargs="*", default=None, help="default: what fits, per batch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--fusion", nargs="+", choices=["off", "on"], default=["off"],
                   help="the model as loaded (off) and/or with worker_svc.fusion installed (on), in this order")
    p.add_argument("--profile", action="store_true", help="also group graph kernel time by kind")
    p.add_argument("--json", default="docs/bench/floor.json")
    args = p.parse_args(argv)
    from worker_svc import fusion
    from worker_svc.models import load

    record = {
        "command": "python -m bench floor " + shlex.join(sys.argv[2:] if argv is None else argv),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model, "dtype": "bfloat16",
        "hbm_gb_s": hbm_bandwidth_gb_s(), "entries": [],
    }
    print(f"HBM copy bandwidth {record['hbm_gb_s']:.0f} GB/s", flush=True)
    loaded = load(args.model, device="cuda", dtype=torch.bfloat16, skip_tokenizer=True)
    exact = reference = None
    if "on" in args.fusion:  # the oracle: the bf16 weights in float32, unfused (dropped before the grid)
        oracle = load(args.model, device="cuda", dtype=torch.float32, skip_tokenizer=True)
        with torch.no_grad():
            for wide, narrow in zip(oracle.model.parameters(), loaded.model.parameters(), strict=True):
                wide.copy_(narrow)
        exact = check_prompt(oracle)
        del oracle, wide, narrow
        gc.collect()
        torch.cuda.empty_cache()
        reference = check_prompt(loaded)
    outputs: dict = {}
    for mode in args.fusion:
        if mode == "on":
            record["fused_layers"] = fusion.apply(loaded.model)
        run_grid(loaded, args, record, mode, outputs)
    if reference is not None:
        fused = check_prompt(loaded)
        # bf16 against bf16 differs by rounding compounded over the layers; what tells whether fusion
        # costs accuracy is each one's distance from the float32 oracle.
        record["fusion_check"] = {"prompt_sdpa": logits_check(reference, fused),
                                  "unfused_vs_fp32": logits_check(exact, reference),
                                  "fused_vs_fp32": logits_check(exact, fused),
                                  "first_step": compare_modes(outputs)}
        print(json.dumps(record["fusion_check"]), flush=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
