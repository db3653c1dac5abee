"""Token-ids-only serving (worker --skip-tokenizer, like vLLM's --skip-tokenizer-init): a model directory
without tokenizer files is refused saying what is missing and offering the flag; with it, the server
generates from token ids exactly as the same weights do with a tokenizer, answers no text, and refuses
text and chat prompts, stop strings and Tokenize with INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import openai
import pytest
import torch

from client import AsyncTandemClient, TandemError
from client.local_server import TandemServer
from tests.conftest import TINY_WORKER_ARGS
from worker_svc import models

PROMPTS = [[5, 6, 7, 8], [100, 200, 300], [42] * 20]


async def _invalid(coro, field: str) -> None:
    with pytest.raises(TandemError) as err:
        await coro
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert field in [f for f, _ in err.value.field_violations], err.value
    assert "--skip-tokenizer" in str(err.value), err.value


def test_token_ids_only_server(tmp_path: Path, tiny):
    models.load("random:tiny-llama", "cpu", torch.float32, seed=0).model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer files.*--skip-tokenizer"):
        models.load(str(tmp_path), "cpu", torch.float32)

    async def generate(address: str) -> list:
        async with AsyncTandemClient(address) as c:
            return await asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=12, temperature=0, ignore_eos=True)
                                          for p in PROMPTS))

    with TandemServer(model=str(tmp_path), worker_args=[*TINY_WORKER_ARGS, "--skip-tokenizer"], http=True) as bare:
        got = asyncio.run(generate(bare.address))
        # The same weights behind a tokenizer (the `tiny` server) give the same tokens, with text.
        want = asyncio.run(generate(tiny.address))
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert all(r.text == "" for r in got) and all(r.text for r in want)

        async def refusals() -> None:
            async with AsyncTandemClient(bare.address) as c:
                await _invalid(c.generate("Hello", max_new_tokens=4), "text")
                await _invalid(c.generate(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=4), "chat")
                await _invalid(c.generate(token_ids=[5, 6], max_new_tokens=4, stop=["x"]), "stop")
                await _invalid(c.tokenize("Hello"), "text")
                # A stream of token ids works, and carries tokens without text.
                chunks = [ch async for ch in c.generate_stream(token_ids=PROMPTS[0], max_new_tokens=5,
                                                               temperature=0, ignore_eos=True)]
                assert sum(len(ch.token_ids) for ch in chunks) == 5 and not any(ch.text for ch in chunks)
                assert (await c.model_info()).vocab_size > 0
                # Constraints need the tokenizer: no engine announced, and a constraint is refused saying why.
                assert (await c.model_info()).structured_output_engine == ""
                async with AsyncTandemClient(tiny.address) as with_tokenizer:  # the same weights, a tokenizer
                    assert "xgrammar" in (await with_tokenizer.model_info()).structured_output_engine
                await _invalid(c.generate(token_ids=[5, 6], max_new_tokens=4, regex="a+"), "regex")
                await _invalid(c.generate(token_ids=[5, 6], max_new_tokens=4, json_schema={"type": "object"}),
                               "json_schema")

        asyncio.run(refusals())
        # The HTTP API likewise: token ids in (logprobs name no token strings), chat refused naming it.
        oa = openai.OpenAI(base_url=bare.base_url, api_key="unused")
        model = oa.models.list().data[0].id
        r = oa.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
        assert r.choices[0].text == "" and r.usage.completion_tokens == 12
        with pytest.raises(openai.BadRequestError) as bad:
            oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert "--skip-tokenizer" in str(bad.value) and bad.value.body["param"] == "messages", bad.value.body
        st = bare.wait_idle(5)
        assert st.kv_blocks_free == st.kv_blocks_total
