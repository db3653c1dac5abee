"""CUDA graphs of the worker's steps: decode graphs (cuda_graphs.py), piecewise graphs for prefill and
mixed steps (piecewise.py), and their capture into one shared pool (graph_capture.py).

Sits above attention, the sampler and the step forward, and below the runner, which has them captured
(graph_capture.capture_graphs) and replays them.
"""
