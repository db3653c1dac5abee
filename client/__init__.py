"""Tandem client library (sync and asyncio) and the `tandem` command line.

Depends only on grpc and the generated `tandem.v1` stubs:

    from client import TandemClient
    with TandemClient("localhost:50051") as c:
        print(c.generate("What is the capital of France?", max_new_tokens=32).text)
"""

from .async_client import AsyncGenerateStream, AsyncTandemClient
from .sync_client import DEFAULT_ADDRESS, GenerateStream, TandemClient
from .types import (
    Completion,
    GenerationResult,
    ModelInfo,
    StreamChunk,
    TandemError,
    Timings,
    TokenizeResult,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "AsyncGenerateStream",
    "AsyncTandemClient",
    "Completion",
    "GenerateStream",
    "GenerationResult",
    "ModelInfo",
    "StreamChunk",
    "TandemClient",
    "TandemError",
    "Timings",
    "TokenLogprob",
    "TokenizeResult",
    "TopLogprob",
    "Usage",
]
