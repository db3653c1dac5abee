"""The decode step's GEMMs, in sequence, as the fused forward issues them: which cuBLAS path and call
form stream the 8B shape's weights fastest at the step's row counts. Timed on a GPU.

Owns an experiment: every layer's merged QKV, o, merged gate/up and down weights (random bf16, 32
layers, each its own tensor so that nothing stays in the L2) plus the LM head, multiplied in order
by random activations, as one CUDA graph; GB/s of the weight stream. Variants: `default`
(F.linear, what the forward does); `+add` (down's output added to a residual by a separate add, as
the fused layer does today); `addmm` (down accumulated into the residual in place by the GEMM,
beta = 1: one launch less per layer); and each with cuBLASLt preferred
(`torch.backends.cuda.preferred_blas_library`), globally or for o and down only.

    python -m bench.linear_probe [--json F] [--rows 32 128 256]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.floor_parts import graph_ms

HIDDEN, INTER, QKV, VOCAB, LAYERS = 4096, 14336, 6144, 128256, 32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.linear_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--rows", type=int, nargs="+", default=[32, 128, 256])
    args = p.parse_args(argv)
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    layers = [{"qkv": torch.randn(QKV, HIDDEN, **bf) * 0.02, "o": torch.randn(HIDDEN, HIDDEN, **bf) * 0.02,
               "gate_up": torch.randn(2 * INTER, HIDDEN, **bf) * 0.02, "down": torch.randn(HIDDEN, INTER, **bf) * 0.02}
              for _ in range(LAYERS)]
    head = torch.randn(VOCAB, HIDDEN, **bf) * 0.02
    wbytes = (sum(w.numel() for layer in layers for w in layer.values()) + head.numel()) * 2
    stream = torch.cuda.Stream()
    default_lib = torch.backends.cuda.preferred_blas_library()
    record: dict = {"gpu": torch.cuda.get_device_name(), "weight_bytes": wbytes, "default_blas": str(default_lib),
                    "entries": []}

    def lib(name):
        torch.backends.cuda.preferred_blas_library(name)

    for rows in args.rows:
        x = torch.randn(rows, HIDDEN, **bf)
        xi = torch.randn(rows, INTER, **bf)
        res = torch.randn(rows, HIDDEN, **bf)

        def seq(down: str, lt_od: bool, x=x, xi=xi, res=res) -> None:
            for w in layers:
                F.linear(x, w["qkv"])
                if lt_od:
                    lib("cublaslt")
                F.linear(x, w["o"])
                if lt_od:
                    lib(default_lib)
                F.linear(x, w["gate_up"])
                if lt_od:
                    lib("cublaslt")
                if down == "linear":
                    F.linear(xi, w["down"])
                elif down == "add":
                    _ = res + F.linear(xi, w["down"])
                else:
                    res.addmm_(xi, w["down"].t())
                if lt_od:
                    lib(default_lib)
            F.linear(x, head)

        variants = {}
        for name, down, glob, lt_od in (("default", "linear", None, False), ("+add", "add", None, False),
                                        ("addmm", "addmm", None, False), ("lt", "linear", "cublaslt", False),
                                        ("lt+add", "add", "cublaslt", False), ("lt addmm", "addmm", "cublaslt", False),
                                        ("lt o/down", "linear", None, True), ("lt o/down addmm", "addmm", None, True)):
            try:
                if glob:
                    lib(glob)
                with torch.inference_mode():
                    ms = [graph_ms(lambda d=down, lo=lt_od: seq(d, lo), stream) for _ in range(2)]
                variants[name] = {"ms": ms, "gb_s": wbytes / min(ms) / 1e6}
            except Exception as e:
                variants[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            finally:
                lib(default_lib)
        # Correctness of the addmm form: residual + x @ W^T against the separate add, in float32.
        w = layers[0]["down"]
        want = res.float() + xi.float() @ w.float().t()
        got = res.clone().addmm_(xi, w.t()).float()
        entry = {"rows": rows, "variants": variants,
                 "addmm_rel_err": float((got - want).norm() / want.norm()),
                 "add_rel_err": float(((res + F.linear(xi, w)).float() - want).norm() / want.norm())}
        record["entries"].append(entry)
        print(json.dumps(entry), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
