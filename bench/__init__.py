"""Benchmarks of Tandem against plain transformers; each module runs as `python -m bench.<name>`."""
