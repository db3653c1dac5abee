"""Triton kernels of the worker (paged attention, the fused sampler) and the noise hash they share with
the PyTorch sampler. Imports run one way: the worker's modules import these, never the reverse."""
