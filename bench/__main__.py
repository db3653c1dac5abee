"""`python -m bench cpu|gpu|floor|sweep|graph-memory|plan-cost|host-e2e|prefix-cache|http-vs-grpc|tp-step|hf-peer
...`: the committed benchmarks (see docs/benchmarks.md). Others run as modules, e.g. `python -m
bench.busy_check`, `python -m bench.structured_output`."""

from __future__ import annotations

import sys


def main() -> int:
    names = ("cpu", "gpu", "floor", "sweep", "graph-memory", "plan-cost", "host-e2e", "prefix-cache", "http-vs-grpc",
             "tp-step", "hf-peer")
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print(f"usage: python -m bench {{{','.join(names)}}} [options]"
              "  (add --help after the name for its options)")
        return 2
    which = sys.argv[1]
    if which == "cpu":
        from bench.cpu_e2e import main as run
    elif which == "floor":
        from bench.floor import main as run
    elif which == "sweep":
        from bench.rate_sweep import main as run
    elif which == "graph-memory":
        from bench.graph_memory import main as run
    elif which == "plan-cost":
        from bench.plan_cost import main as run
    elif which == "host-e2e":
        from bench.host_e2e import main as run
    elif which == "prefix-cache":
        from bench.prefix_cache import main as run
    elif which == "http-vs-grpc":
        from bench.http_vs_grpc import main as run
    elif which == "tp-step":
        from bench.tp_step import main as run
    elif which == "hf-peer":
        from bench.hf_peer import main as run
    else:
        from bench.gpu_async import main as run
    return run(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
