"""`tandem bench --backend openai`: the same workloads through an OpenAI-compatible HTTP API.

Owns sending one bench request as a streaming `/v1/completions` (token-id or text prompts) or
`/v1/chat/completions` (messages) call with the official `openai` package (`AsyncOpenAI`), and filling
the same `RequestRecord` the gRPC path fills: the arrival time of each chunk that carried tokens and
how many (`return_token_ids`, which Tandem and vLLM serve, gives the ids; a server without it counts
one token per chunk with text), the usage from `stream_options.include_usage`, the finish reason.
Failures are recorded under the gRPC status name the HTTP status corresponds to (429 ->
RESOURCE_EXHAUSTED, 503 -> UNAVAILABLE, ...), so both backends' reports count them alike. Works
against any OpenAI-compatible server (Tandem's `--http-port`, vLLM, SGLang, TGI); `ignore_eos` and
`return_token_ids` go as extra body fields, which OpenAI's own API would refuse.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from client.bench.metrics import RequestRecord

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 503: "UNAVAILABLE",
                504: "DEADLINE_EXCEEDED"}


def _openai():
    try:
        import openai
    except ImportError as exc:  # an optional dependency: the bench and dev extras bring it
        raise ValueError("--backend openai needs the openai package (pip install 'tandem[bench]')") from exc
    return openai


class OpenAIBackend:
    """An AsyncOpenAI client for one base URL (…/v1), with the health and model calls the runner needs."""

    def __init__(self, base_url: str, api_key: str | None = None, tls_ca: str | None = None,
                 model: str | None = None) -> None:
        openai = _openai()
        self.address = base_url.rstrip("/")
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=tls_ca) if tls_ca else True
        self._http = openai.DefaultAsyncHttpxClient(verify=verify, timeout=None)
        self.client = openai.AsyncOpenAI(base_url=self.address, api_key=api_key or "none", max_retries=0,
                                         http_client=self._http, timeout=None)
        self.model = model
        self._errors = openai

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def health(self, timeout: float = 2.0) -> bool:
        """GET /health (beside /v1) answers 200."""
        try:
            resp = await self._http.get(self.address.removesuffix("/v1") + "/health", timeout=timeout)
        except Exception:
            return False
        return resp.status_code == 200

    async def server_stats(self, timeout: float = 10.0) -> None:
        return None  # no GetStats over HTTP: the prefix-cache figures stay empty

    async def model_info(self) -> dict[str, Any]:
        """The served model (the first of /v1/models unless one was named) and what its card says."""
        models = (await self.client.models.list()).data
        card = next((m for m in models if m.id == self.model), models[0] if models else None)
        if card is None:
            raise ValueError(f"{self.address}/models lists no model")
        self.model = self.model or card.id
        extra = card.model_extra or {}
        return {"model": self.model, "max_context": extra.get("max_model_len"), "vocab_size": extra.get("vocab_size"),
                "backend": "openai", "base_url": self.address}

    async def stream(self, prompt: dict[str, Any], max_tokens: int, temperature: float | None, seed: int,
                     ignore_eos: bool, timeout: float | None, rec: RequestRecord) -> None:
        """Sends one request and fills `rec` (errors included: never raises for a failed request)."""
        common: dict[str, Any] = {
            "model": self.model, "max_tokens": max_tokens, "stream": True, "seed": seed,
            "stream_options": {"include_usage": True},
            "extra_body": {"ignore_eos": ignore_eos, "return_token_ids": True}, "timeout": timeout,
        }
        if temperature is not None:
            common["temperature"] = temperature
        chat = "messages" in prompt
        errors = self._errors
        try:
            if chat:
                stream = await self.client.chat.completions.create(messages=prompt["messages"], **common)
            else:
                text = prompt["token_ids"] if "token_ids" in prompt else prompt["prompt"]
                stream = await self.client.completions.create(prompt=text, **common)
            async for chunk in stream:
                now = time.perf_counter()
                rec.request_id = rec.request_id or chunk.id
                if chunk.usage is not None:
                    rec.output_tokens = chunk.usage.completion_tokens
                    rec.prompt_tokens = chunk.usage.prompt_tokens or rec.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    rec.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                ids = (choice.model_extra or {}).get("token_ids")
                text_delta = choice.delta.content if chat else choice.text
                n = len(ids) if ids is not None else int(bool(text_delta))
                if n:
                    rec.chunk_times.append(now)
                    rec.chunk_tokens.append(n)
                    rec.output_token_ids.extend(ids or ())
                if choice.finish_reason:
                    rec.finish_reason = choice.finish_reason
        except errors.APIStatusError as e:
            rec.error_code = STATUS_NAMES.get(e.status_code, f"HTTP_{e.status_code}")
            rec.error = e.message
        except errors.APITimeoutError as e:
            rec.error_code, rec.error = "DEADLINE_EXCEEDED", str(e)
        except errors.APIConnectionError as e:
            rec.error_code, rec.error = "UNAVAILABLE", str(e)
        except errors.APIError as e:  # an error event inside the stream
            rec.error_code, rec.error = "STREAM_ERROR", e.message
