"""The scheduler's front end: the gRPC and HTTP-facing process (`python -m scheduler_svc`).

Owns start-up (`server.py`), the public gRPC API (`servicer.py`, with `decode_guard.py` and `auth.py`),
the OpenAI-compatible HTTP API (`http_api/`), what both share about one request (`admission.py`:
validation, admission, the stream of deltas), request validation (`validation.py`), tokenizing and
detokenizing with stop strings (`tokenizer.py`, `detokenizer.py`, `handle.py`), n samples
(`sample_group.py`), Prometheus metrics (`metrics.py`) and its end of the core link
(`engine_client.py`, which starts the core process). Imports from `scheduler_svc.core`, never the
other way round.
"""
