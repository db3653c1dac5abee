"""The scheduler's engine core: what plans steps and talks to the worker (`python -m scheduler_svc.core`).

Owns the core process (`__main__.py`: started and supervised by the front end's `frontend/engine_client.py`), its
engine loop (`engine.py`), the continuous-batching scheduler (`scheduler.py`, with `limits.py`,
`row_table.py`, `block_manager.py`, `plan_params.py`), the constraint ledger (`grammar_book.py`), the
request state both processes share (`request.py`), the engine link to the worker (`link.py`) and the
private link to the front end (`core_link.py`). Pure Python + numpy, never torch; imports nothing from
`scheduler_svc.frontend`.
"""
