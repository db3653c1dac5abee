"""The OpenAI-compatible HTTP API, driven by the official `openai` package (sync, async, streaming)
against one real scheduler + worker serving gRPC and HTTP side by side, with API keys on.

Exact comparisons throughout: the HTTP text of a greedy request equals gRPC's for the same prompt
on the same server, streamed text equals the whole response, a seed repeats its text, a 400 names
the OpenAI parameter. A client that disconnects (streaming or not) frees its KV blocks within 1 s.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from client import TandemClient
from client.local_server import ROOT, TandemServer, free_port
from tests.conftest import TINY_WORKER_ARGS

KEY = "k-0123456789abcdef-http"
MODEL = "random:tiny-llama"
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server():
    with TandemServer(MODEL, http=True, worker_args=TINY_WORKER_ARGS, api_key=KEY, env={"TANDEM_API_KEYS": KEY},
                      scheduler_args=["--pipeline-depth", "2", "--debug-check-state",
                                      "--health-without-auth"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def oa(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(server):
    with TandemClient(server.address, api_key=KEY) as c:
        yield c


def _raw(server, path: str, body: dict | bytes | None = None, key: str | None = KEY) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.base_url.removesuffix("/v1") + path, data=data,
                                 headers={"content-type": "application/json",
                                          **({"authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_models_health_tokenize(server, oa, grpc_client):
    info = grpc_client.model_info()
    models = oa.models.list().data
    assert [m.id for m in models] == [info.model] == [MODEL]
    assert _raw(server, "/health", key=None)[0] == 200  # --health-without-auth
    status, body = _raw(server, "/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert status == 200
    assert json.loads(body)["tokens"] == grpc_client.tokenize(PROMPT).token_ids


def test_api_keys_are_required(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/v1/completions"):
        status, body = _raw(server, path, {"model": MODEL, "prompt": PROMPT} if "compl" in path else None, key=None)
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"


def test_greedy_completion_equals_grpc(oa, grpc_client):
    ref = grpc_client.generate(PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True)
    r = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                              extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = r.choices[0]
    assert choice.text == ref.text and choice.model_extra["token_ids"] == ref.token_ids
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.usage.prompt_tokens, 24)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    # The same prompt as token ids, then as a list of one string: the same text.
    ids = grpc_client.tokenize(PROMPT).token_ids
    assert oa.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text == ref.text
    assert oa.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=24, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text == ref.text


def test_chat_stream_with_usage_equals_whole(oa, grpc_client, server):
    whole = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == grpc_client.generate(messages=CHAT, max_new_tokens=20, temperature=0,
                                                                    ignore_eos=True).text
    chunks = list(oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # Asked again, the prompt's full blocks come from the prefix cache (16-token blocks).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (whole.usage.prompt_tokens - 1) // 16 * 16
    # The wire format itself: server-sent events ending with data: [DONE].
    status, body = _raw(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True})
    events = [line for line in body.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_async_client_streams_concurrently(server, oa):
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client:
            async def one(i: int) -> str:
                stream = await client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=12,
                                                         temperature=0, stream=True, extra_body={"ignore_eos": True})
                return "".join([c.choices[0].text async for c in stream if c.choices])
            return await asyncio.gather(*(one(i) for i in range(4)))

    texts = asyncio.run(run())
    for i, text in enumerate(texts):
        assert text == oa.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text


def test_stop_string_and_length(oa):
    full = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text
    stop = full[8:11]
    assert len(stop) == 3 and stop.strip(), full
    r = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "\x00never"],
                              extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    streamed = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True,
                                     extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:full.index(stop)]
    short = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5


def test_seed_repeats(oa):
    def sample(seed: int) -> str:
        return oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, seed=seed,
                                          extra_body={"ignore_eos": True}).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    # 16 tokens sampled at temperature 1 from a random model's ~49k-token vocabulary: another seed giving
    # the same text would be astronomically unlikely, so this inequality cannot flake.
    assert sample(8) != first


def test_logprobs(oa):
    r = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                              extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and chosen == max(top.values())  # greedy: the sampled token is the top one
    c = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                   top_logprobs=3, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == c.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == t.top_logprobs[0].logprob
        assert bytes(t.bytes).decode() == t.token


BAD = [
    ("completions", {"temperature": -1}, "temperature", "must be a finite number >= 0"),
    ("completions", {"max_tokens": 100_000}, "max_tokens", "exceed"),
    ("completions", {"max_tokens": 0}, "max_tokens", "at least 1"),
    ("completions", {"top_p": 1.5}, "top_p", "(0, 1]"),
    ("completions", {"logprobs": 1000}, "logprobs", "at most 20"),
    ("completions", {"prompt": ["a", "b"]}, "prompt", "several prompts"),
    ("completions", {"prompt": ""}, "prompt", "must not be empty"),
    ("completions", {"seed": -1}, "seed", "[0, 2^64)"),
    ("completions", {"stop": ["x"] * 17}, "stop", "at most 16"),
    ("completions", {"temperature": "hot"}, "temperature", "number"),
    ("completions", {"n": 17}, "n", "must be in [1, 16]"),
    ("completions", {"n": 0}, "n", "must be in [1, 16]"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ("completions", {"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
    ("completions", {"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ("completions", {"logit_bias": {"5": 500}}, "logit_bias", "[-100, 100]"),
    ("completions", {"logit_bias": {"five": 1}}, "logit_bias", "keys are token ids"),
    ("completions", {"logit_bias": {"99999999": 1}}, "logit_bias", "outside the vocabulary"),
    ("completions", {"min_tokens": 30, "max_tokens": 10}, "min_tokens", "exceeds"),
    ("completions", {"min_tokens": -1}, "min_tokens", "out of range"),
    ("chat", {"max_completion_tokens": 100_000}, "max_completion_tokens", "exceed"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "unknown role"),
    ("chat", {"messages": []}, "messages", "must not be empty"),
    ("chat", {"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 50}, "top_logprobs", "at most 20"),
]


@pytest.mark.parametrize(("endpoint", "change", "param", "words"), BAD)
def test_bad_values_name_the_parameter(server, endpoint, change, param, words):
    body = {"model": MODEL, **({"prompt": PROMPT} if endpoint == "completions" else {"messages": CHAT}), **change}
    status, raw = _raw(server, f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", body)
    err = json.loads(raw)["error"]
    assert (status, err["param"], err["type"]) == (400, param, "invalid_request_error"), err
    assert words in err["message"], err


def test_openai_errors(server, oa):
    with pytest.raises(openai.BadRequestError) as bad:
        oa.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        oa.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert missing.value.body["code"] == "model_not_found" and missing.value.param == "model"
    assert _raw(server, "/v1/completions", b"{not json")[0] == 400


def test_sampling_controls(oa, server):
    """Penalties through HTTP give gRPC's tokens for the same request, and act: a logit bias that makes
    one token win every step alone is overcome by a frequency penalty once the token has repeated; a
    +100 bias makes every token the biased one; min_tokens holds off a stop token otherwise sampled first."""
    from tandem.v1 import api_pb2, api_pb2_grpc

    token = 1234
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 2.0, "repetition_penalty": 2.0}
    with grpc.insecure_channel(server.address) as ch:
        ref = api_pb2_grpc.TandemStub(ch).Generate(api_pb2.GenerateRequest(
            text=PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True, logit_bias={token: 30.0}, **penalties),
            metadata=[("authorization", f"Bearer {KEY}")], timeout=30)
    r = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logit_bias={str(token): 30},
                              presence_penalty=0.5, frequency_penalty=2.0,
                              extra_body={"ignore_eos": True, "repetition_penalty": 2.0, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == list(ref.token_ids)
    plain = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                  logit_bias={str(token): 30},
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert plain.choices[0].model_extra["token_ids"] == [token] * 16
    assert ref.token_ids[0] == token and list(ref.token_ids) != [token] * 16  # the penalties did something

    biased = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                   logit_bias={str(token): 100}, extra_body={"ignore_eos": True,
                                                                             "return_token_ids": True})
    assert biased.choices[0].model_extra["token_ids"] == [token] * 6
    stop_first = {"logit_bias": {str(token): 100}, "stop_token_ids": [token], "return_token_ids": True}
    early = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body=stop_first)
    assert early.choices[0].model_extra["token_ids"] == [token] and early.choices[0].finish_reason == "stop"
    held = oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                 extra_body={**stop_first, "min_tokens": 4})
    ids = held.choices[0].model_extra["token_ids"]
    assert len(ids) == 5 and token not in ids[:4] and ids[4] == token, ids
    assert held.choices[0].finish_reason == "stop" and held.choices[0].model_extra["stop_reason"] == token


def test_n_samples(oa):
    """n = 3: three distinct choices, sample i the text of a single request seeded derive_seed(seed, i)
    (sample 0: the seed itself); usage counts the prompt once and every sample's tokens; a stream of
    n = 2 interleaves the samples by index and gives each the text the whole response has."""
    from tandem.samples import derive_seed

    def one(seed: int, **kw) -> openai.types.Completion:
        return oa.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed,
                                     extra_body={"ignore_eos": True}, **kw)

    r = one(5, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    # 10 tokens at temperature 1 from a ~49k vocabulary: two samples alike would be astronomically unlikely.
    assert len(set(texts)) == 3
    assert texts == [one(5).choices[0].text, one(derive_seed(5, 1)).choices[0].text,
                     one(derive_seed(5, 2)).choices[0].text]
    single = one(5)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (single.usage.prompt_tokens, 30)

    whole = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=9, n=2,
                                       extra_body={"ignore_eos": True})
    chunks = list(oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=9, n=2,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
    streamed = {0: "", 1: ""}
    finishes = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        streamed[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert streamed == {c.index: c.message.content for c in whole.choices}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def _back_within(server, seconds: float) -> None:
    st = server.wait_idle(timeout=seconds)
    assert (st.num_running, st.num_waiting) == (0, 0) and st.kv_blocks_free == st.kv_blocks_total, st


def test_disconnect_frees_kv(server, oa):
    """A stream closed after a few chunks, a stream of n = 2 samples, and a non-streaming request whose
    client times out each end what is still running (1500 tokens to go, seconds of work here): every
    KV block is back within 1 s."""
    server.wait_idle()
    stream = oa.completions.create(model=MODEL, prompt=[7] * 50, max_tokens=1500, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].text)
        if got >= 3:
            break
    running = server.stats()
    assert running.num_running == 1 and running.kv_blocks_free < running.kv_blocks_total
    stream.close()
    _back_within(server, 1.0)

    both = oa.completions.create(model=MODEL, prompt=[8] * 40, max_tokens=1500, temperature=1.0, seed=1, n=2,
                                 stream=True, extra_body={"ignore_eos": True})
    seen: set[int] = set()
    for chunk in both:
        seen.update(c.index for c in chunk.choices)
        if seen == {0, 1}:
            break
    assert server.stats().num_running == 2  # both samples running when the client goes
    both.close()
    _back_within(server, 1.0)

    async def unary() -> None:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=1.0) as client:
            call = asyncio.ensure_future(client.completions.create(model=MODEL, prompt=[9] * 30, max_tokens=1500,
                                                                   extra_body={"ignore_eos": True}))
            await asyncio.sleep(0.5)
            assert server.stats().num_running == 1  # admitted and running when the client gives up
            with pytest.raises(openai.APITimeoutError):
                await call
        t0 = time.monotonic()
        _back_within(server, 1.0)
        assert time.monotonic() - t0 < 1.0

    asyncio.run(unary())


def test_http_bind_needs_auth_or_insecure():
    port = free_port()
    cmd = [sys.executable, "-m", "scheduler_svc", "--address", f"127.0.0.1:{free_port()}", "--engine-address",
           f"ipc:///tmp/tandem-http-bind-{port}.sock", "--http-port", str(port), "--http-host", "0.0.0.0"]
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert refused.returncode == 2 and "without authentication" in refused.stderr, refused.stderr


def test_bench_openai_backend_matches_grpc(server):
    """`tandem bench --backend openai` records what the gRPC backend records for the same greedy workload:
    the same output token ids per request, every token in some chunk, the usage's counts."""
    from client.bench.runner import LoadSpec, run_load
    from client.bench.workloads import random_requests

    requests = random_requests(4, 24, 10, 49152, seed=3)
    spec = LoadSpec(ignore_eos=True, temperature=0.0)
    conn = {"api_key": KEY}
    grpc_run = asyncio.run(run_load(server.address, requests, spec, connection=conn))
    http_run = asyncio.run(run_load(server.base_url, requests, spec, connection=conn, backend="openai"))
    for g, h in zip(grpc_run.records, http_run.records, strict=True):
        assert g.ok and h.ok, (g.error, h.error)
        assert h.output_token_ids == g.output_token_ids and len(h.output_token_ids) == 10
        assert (h.output_tokens, sum(h.chunk_tokens), h.prompt_tokens) == (10, 10, 24)
        assert h.ttft is not None and h.finish_reason == "length"
