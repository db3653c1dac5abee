"""The OpenAI-compatible HTTP front end: a second API of the scheduler process, beside gRPC.

`app.py` (FastAPI routes), `schemas.py` (pydantic request/response models), `convert.py` (OpenAI
body -> tandem.v1 GenerateRequest, results -> OpenAI objects), `errors.py` (OpenAI error objects,
gRPC-equivalent status mapping), `serve.py` (uvicorn inside the scheduler's asyncio loop). It shares
the gRPC servicer's building blocks (validation, admission, streaming deltas, limits, auth keys,
metrics); nothing in the core or the gRPC path imports it.
"""
