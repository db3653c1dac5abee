"""Acceptance: stop strings that span tokens truncate exactly, and streamed text never shows any of them."""

from __future__ import annotations

import asyncio

import pytest

from client import AsyncTandemClient

PROMPT = [{"role": "user", "content": "Count from one to twenty in words, separated by commas."}]


@pytest.mark.slow
def test_stop_string_across_tokens_streamed(smol, smol_tokenizer):
    async def run():
        async with AsyncTandemClient(smol.address) as c:
            full = await c.generate(messages=PROMPT, max_new_tokens=60, temperature=0)
            pieces = [smol_tokenizer.decode([t]) for t in full.token_ids]
            # A stop from the middle of token k to the middle of token k+2: it spans three tokens.
            k = next(i for i in range(4, len(pieces) - 3) if all(len(p) >= 2 for p in pieces[i:i + 3]))
            start = sum(len(p) for p in pieces[:k]) + len(pieces[k]) // 2
            end = sum(len(p) for p in pieces[:k + 2]) + len(pieces[k + 2]) // 2
            stop = full.text[start:end]
            expected = full.text[:full.text.index(stop)]
            shown, last = "", None
            async for chunk in c.generate_stream(messages=PROMPT, max_new_tokens=60, temperature=0,
                                                 stop=["never-appears", stop]):
                shown += chunk.text
                assert expected.startswith(shown), (shown, expected)
                last = chunk
            return stop, expected, shown, last

    stop, expected, shown, last = asyncio.run(run())
    assert shown == expected
    assert last.completion is not None
    assert last.completion.finish_reason == "stop_string"
    assert last.completion.matched_stop == stop
    st = smol.wait_idle()
    assert st.kv_blocks_free == st.kv_blocks_total
