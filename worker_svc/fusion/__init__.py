"""Fused decoder forwards for the decode step: merged QKV and gate/up GEMMs, RMSNorm (+ residual add),
SiLU x up and RoPE in one launch each, installed on a loaded transformers model (install.apply).

On by default where the worker runs on CUDA (`--no-fuse` turns it off; `bench floor --fusion`); the
unfused model is the oracle (tests/test_fusion.py). kernels.py: the Triton kernels; ops.py: the
dispatch and the PyTorch formulas; install.py: which modules qualify and their replacement forwards.
"""

from worker_svc.fusion.install import apply, lt_weights, matmul_weights

__all__ = ["apply", "lt_weights", "matmul_weights"]
