"""`python -m worker_svc` / `tandem-worker`: load the model, connect to the scheduler, serve steps.

Owns the command line (every flag has a TANDEM_* environment twin), logging setup, signal
handling and the exit status: 0 after SIGTERM/SIGINT or the scheduler's orderly BYE, 1 when the
scheduler goes away, 2 on bad arguments or a load error (or a scheduler of another instance: REJECT
final), 3 when one step hangs, 4 when a scheduler with a live worker refuses this one, 5 when another
worker replaced this one deliberately. Heavy imports (torch, transformers) happen after parsing so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from tandem import exit_codes
from tandem.envargs import EnvArgumentParser, default_engine_address
from tandem.logs import configure as configure_logging

log = logging.getLogger("tandem.worker")


def build_parser() -> EnvArgumentParser:
    p = EnvArgumentParser(prog="tandem-worker", description="Tandem GPU worker: runs the scheduler's steps.")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct, a model directory, a .gguf file, or random:<preset|config.json>")
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="Load a model directory's .bin (pickle) weights when it has no safetensors; loading a "
                        "pickle runs the code it carries, so only for weights you trust.")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks of this worker's tensor-parallel group: one process per rank, rank and rendezvous "
                        "from torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK; "
                        "`tandem serve --tensor-parallel-size N` starts and sets them); NCCL on CUDA, gloo on CPU")
    p.add_argument("--skip-tokenizer", action="store_true",
                   help="Load no tokenizer (a model directory may have none): the server then takes token ids only; "
                        "text and chat prompts and stop strings get INVALID_ARGUMENT, and outputs carry no text.")
    p.add_argument("--engine-address", default=default_engine_address(),
                   help="ZeroMQ address the scheduler's ROUTER is bound at")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=0, help="KV blocks; 0 = size from memory")
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.0,
                   help="KV cache budget when --num-blocks is 0; 0 = 1 GiB on CPU, most free memory on CUDA")
    p.add_argument("--max-num-tokens", type=int, default=512, help="most tokens one step may carry")
    p.add_argument("--max-num-rows", type=int, default=64, help="most requests one step may carry")
    p.add_argument("--max-context", type=int, default=0, help="0 = the model's max_position_embeddings")
    p.add_argument("--seed", type=int, default=0, help="seed of random:<...> weights")
    p.add_argument("--link-curve-secret", default="",
                   help="this worker's CURVE secret key file (NAME.key_secret): encrypted tcp:// engine link")
    p.add_argument("--link-curve-server", default="", help="the scheduler's CURVE public key file (NAME.key)")
    p.add_argument("--instance-token", default="",
                   help="the secret this worker proves to its scheduler (tandem serve hands one to both through "
                   "the environment; prefer the environment to the flag, which `ps` shows)")
    p.add_argument("--replace", action="store_true",
                   help="take the place of the scheduler's live worker (told to exit, status 5), instead of "
                   "being refused; its requests resume on this one")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every step eagerly on CUDA too (no decode or piecewise graphs)")
    # step_clock.BUSY_UNITS, spelled out: that module imports torch, which waits until after parsing.
    p.add_argument("--busy-units", default="leaf", choices=["op", "leaf", "layer"],
                   help="how finely an eager CUDA forward is cut for the GPU-busy figure: every aten op "
                        "(a diagnostic: closest to a kernel timeline, about twice the host time), "
                        "every leaf module, every layer")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="install the fused decoder forwards (worker_svc/fusion: merged QKV and gate/up GEMMs, "
                   "fused RMSNorm, residual add, SiLU x up and RoPE kernels) on Llama-pattern models; default: "
                   "on CUDA, off on CPU (--no-fuse keeps the model as transformers wrote it)")
    p.add_argument("--debug-placeholders", action="store_true",
                   help="assert on the device that no carry-over placeholder sentinel reaches the model")
    p.add_argument("--hang-timeout", type=float, default=300.0,
                   help="exit (status 3) when one step keeps the worker busy this many seconds, so a supervisor "
                   "restarts it; 0 = never")
    p.add_argument("--step-trace", default="",
                   help="a file: one JSON line per plan received, step launched and result sent, on the host's "
                   "monotonic clock (the scheduler's --step-trace shares it; bench.chain_trace joins them)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def fuse_wanted(flag: bool | None, device: str) -> bool:
    """--fuse / --no-fuse, else on CUDA only: there the fused step was 2.2-2.9 ms shorter than the
    unfused one at every measured point (docs/benchmarks.md); on the CPU the unfused model is the
    oracle and its PyTorch formulas gain nothing."""
    return device == "cuda" if flag is None else flag


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, "worker")
    loop_ref: list = []

    def on_signal(signum: int, _frame: object) -> None:
        if loop_ref:
            loop_ref[0].stop_requested = True  # the loop exits at its next poll
        else:
            raise SystemExit(0)  # still loading: nothing to tear down

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    import transformers

    from worker_svc import models
    from worker_svc.link import WorkerLink
    from worker_svc.loop import WorkerLoop
    from worker_svc.parallel import tensor_parallel
    from worker_svc.parallel.group_link import FollowerLink, LeaderLink
    from worker_svc.runner import Engine, EngineConfig
    from worker_svc.structured import grammar as grammar_mod

    transformers.utils.logging.disable_progress_bar()
    try:
        device = models.resolve_device(args.device)
        dtype = models.resolve_dtype(args.dtype, device)
        group = tensor_parallel.group_from_env(args.tensor_parallel_size)
    except ValueError as exc:
        log.error("%s", exc)
        return exit_codes.LOAD_ERROR
    control = tensor_parallel.init_group(group, device) if group is not None else None
    log.info("loading %s on %s (%s)", args.model, device, dtype)
    try:
        loaded = models.load(args.model, device, dtype, seed=args.seed, max_context=args.max_context,
                             allow_pickle_weights=args.allow_pickle_weights, skip_tokenizer=args.skip_tokenizer)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        log.error("cannot load --model %s: %s", args.model, exc)
        return exit_codes.LOAD_ERROR
    if group is not None:
        try:
            tensor_parallel.shard_model(loaded.model, group.rank, group.world_size)
        except ValueError as exc:
            log.error("cannot split --model %s: %s", args.model, exc)
            return exit_codes.LOAD_ERROR
    # After sharding: the fused forwards take their head counts from the local weights.
    if fuse_wanted(args.fuse, device):
        from worker_svc import fusion

        fusion.apply(loaded.model)
    grammar = None
    if loaded.tokenizer_json and grammar_mod.engine_name():  # constraints need the tokenizer and xgrammar
        grammar = grammar_mod.GrammarEngine(loaded.tokenizer_json, loaded.vocab_size, loaded.eos_token_ids)
        log.info("structured output: %s", grammar.name)
    else:
        log.info("structured output off: %s", "no tokenizer (--skip-tokenizer)" if not loaded.tokenizer_json
                 else "xgrammar is not installed")
    engine = Engine(loaded, EngineConfig(
        block_size=args.block_size, num_blocks=args.num_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
        cuda_graphs=not args.no_cuda_graphs, debug_placeholders=args.debug_placeholders,
        max_num_tokens=args.max_num_tokens, max_num_rows=args.max_num_rows, busy_units=args.busy_units,
    ), device, grammar=grammar)
    group_blocks = tensor_parallel.group_min(engine.cache.cfg.num_blocks, control) if control is not None else None
    try:
        if group is not None and not group.leader:
            link = FollowerLink(control)  # rank 0 speaks for the group
        else:
            link = WorkerLink(args.engine_address, args.link_curve_secret, args.link_curve_server)
            if control is not None:
                link = LeaderLink(link, control)
    except (ValueError, OSError) as exc:
        log.error("engine link: %s", exc)
        return exit_codes.LOAD_ERROR
    loop = WorkerLoop(engine, link, args.hang_timeout, instance_token=args.instance_token, replace=args.replace,
                      tensor_parallel_size=args.tensor_parallel_size, group_num_blocks=group_blocks,
                      step_trace=args.step_trace)
    loop_ref.append(loop)
    log.info("model %s ready; connecting to %s", loaded.name, args.engine_address)
    try:
        return loop.run()
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
