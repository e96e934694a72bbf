"""helper-104: a hostile client on `/v1/completions` and `/v1/embeddings` against a budgeted key.

Each failing test is a way a key's token or USD budget is charged much less than an
OpenAI-compatible upstream bills the operator for the key's requests (or admission lets through
what the budget cannot pay), with the overspend worked out in its comment. Tests marked
`# SOUND:` pin properties that were checked and hold.

Upstreams are raw TCP servers (`tests.raw_upstream.RawUpstream`): each writes the bytes a real
provider would and then holds the connection until the gateway closes it, so every wait is on
an event, never on time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, Target
from gateway.state import GATE_KEY, KEYS_KEY, USAGE_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    openai_client,
    provider_config,
    start_gateway,
    usage_rows,
)
from tests.raw_upstream import STREAM_HEAD, RawUpstream, auth, charged, cut_after

UPSTREAM_KEY = "sk-upstream-0123456789abcdefghij"

Build = Callable[..., Awaitable[tuple[TestClient[Any, Any], str, RawUpstream]]]


def whole(payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    return head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)


def data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def text_chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m-1",
        "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
    }


def text_completion(
    choices: list[dict[str, Any]], usage: dict[str, int] | None = None
) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m-1",
        "choices": choices,
    }
    if usage is not None:
        answer["usage"] = usage
    return answer


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(
        reply: bytes, *, key: dict[str, Any], model: dict[str, Any] | None = None
    ) -> tuple[TestClient[Any, Any], str, RawUpstream]:
        up = RawUpstream(reply)
        await up.start()
        assert up.server is not None
        servers.append(up.server)
        cfg = provider_config(
            "openai",
            name="up",
            base_url=f"http://127.0.0.1:{up.port}/v1",
            api_keys=(UPSTREAM_KEY,),
        )
        m = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),), **(model or {}))
        gw = await start_gateway(aiohttp_client, make_settings(providers=(cfg,), models=(m,)))
        return gw, await create_key(gw, **key), up

    yield make
    for server in servers:
        server.close()


PRICED = {"input_price_per_mtok": 10.0, "output_price_per_mtok": 30.0}

# 400,000 characters of code-like text: the gateway's own estimate (four characters a token) is
# 100,000 tokens; a real tokenizer spends at least as many on it.
SUFFIX = "x = 1\n" * 66_667
SUFFIX_TOKENS = (len(SUFFIX) + 3) // 4


# --- `suffix`: input the upstream bills, which the gateway never counts ---------------------


async def test_a_cut_stream_with_a_huge_suffix_is_charged_as_if_it_had_none(build: Build) -> None:
    """WRONG: a legacy completion's `suffix` (fill-in-the-middle: the text after the
    insertion point) is prompt input the upstream tokenizes and bills: OpenAI's
    gpt-3.5-turbo-instruct takes it, as do DeepSeek's FIM `/beta/completions`, Ollama's and
    llama.cpp's OpenAI-compatible `/v1/completions`. `CompletionCall.prompt_estimate()` is
    `estimate_input_tokens(request.prompt)`: the suffix is in no estimate. A stream the client
    cuts before the usage chunk is charged that estimate (operations.md "Client hang-ups"), so
    prompt "a" + a 400 KB suffix is charged 1 prompt token + 1 chunk, while the upstream bills
    ~100,000 prompt tokens. Admission's likely size leaves the suffix out too (keys.md: "what
    admission counts: everything an upstream bills as input"), so a key with 1,000 tokens left
    gets every such request through, and each is charged ~2 tokens: three requests below bill
    ~300,000 tokens against a 1,000-token budget; a loop of them has no bound at all (the
    documented bound is one request's actual usage). Realistic: a client needs only to hang up
    after the first chunk; the body (400 KB) is far below `max_body_bytes` (32 MiB, ~8M
    tokens of suffix per request)."""
    reply = STREAM_HEAD + data(text_chunk(0, " y = 2"))
    # (A budget that admits them: one of 1,000 tokens now refuses each at admission, see the
    # next test; what is charged once admitted is what this one checks.)
    gw, secret, up = await build(reply, key={"budget_tokens": 1_000_000})
    body = {"model": "m", "prompt": "a", "suffix": SUFFIX, "max_tokens": 16, "stream": True}
    for _ in range(3):
        await cut_after(gw, secret, "/v1/completions", body, b"y = 2")
    row, spent = await _charged_after(gw, secret, 3)
    assert up.requests[0]["suffix"] == SUFFIX  # the upstream got (and billed) the suffix
    # What the upstream billed: 3 x ~100,000 prompt tokens.
    assert spent >= 3 * SUFFIX_TOKENS, ([r["prompt_tokens"] for r in row], spent)


async def test_admission_lets_a_suffix_far_past_the_budget_through(build: Build) -> None:
    """WRONG: admission holds `prompt_estimate()` (the prompt alone) as a request's likely
    size, so a request whose `suffix` is 100,000 tokens is admitted against a key with 1,000
    tokens left: likely = 1 (prompt "a") + 16 (max_tokens) fits. The upstream bills 100,001
    prompt tokens and reports them; the key is charged them after the fact, 99,017 past its
    budget, in one request. A prompt of the same text in `prompt` is refused (its likely size
    is 100,000), so this is a gap in what admission counts, not the documented overspend of
    a request that used more than its likely size."""
    answer = text_completion(
        [{"text": " y = 2", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        usage(SUFFIX_TOKENS + 1, 4),
    )
    gw, secret, up = await build(whole(answer), key={"budget_tokens": 1_000})
    same_in_prompt = {"model": "m", "prompt": SUFFIX, "max_tokens": 16}
    async with gw.post("/v1/completions", json=same_in_prompt, headers=auth(secret)) as resp:
        assert resp.status == 429, await resp.text()  # the prompt is counted: refused
    body = {"model": "m", "prompt": "a", "suffix": SUFFIX, "max_tokens": 16}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        status = resp.status
        await resp.read()
    assert status == 429, (status, len(up.requests))  # 200: admitted, sent upstream


async def test_a_usd_budget_pays_nothing_for_a_cut_streams_suffix(build: Build) -> None:
    """WRONG (the USD side of the first test): at $10 per million input tokens, the 100,000
    suffix tokens of one cut stream cost the operator $1.00; the key is charged the cost of
    its prompt estimate (1 token) and one chunk: $0.00004. A $0.10 budget pays for ~2,500 such
    requests' worth of the operator's money: 25,000 times its size."""
    reply = STREAM_HEAD + data(text_chunk(0, " y = 2"))
    # (A budget that admits it: one of $0.10 now refuses it at admission.)
    gw, secret, _ = await build(reply, key={"budget_usd": 10.0}, model=PRICED)
    body = {"model": "m", "prompt": "a", "suffix": SUFFIX, "max_tokens": 16, "stream": True}
    await cut_after(gw, secret, "/v1/completions", body, b"y = 2")
    row, _ = await charged(gw, secret)
    assert row["cost_usd"] >= SUFFIX_TOKENS * 10.0 / 1e6, row["cost_usd"]  # $1.00 billed


# --- `best_of` without usage: the hidden candidates -----------------------------------------


async def test_best_of_without_usage_charges_only_the_returned_choice(build: Build) -> None:
    """WRONG (low severity): `best_of: 5, n: 1` makes the upstream generate five candidates
    and return the best; all five are billed (CompletionRequest.choices says so, and the hold
    and the usage bound count five). A whole answer without `usage` is charged its bytes at
    four a token (`pipeline.unreported`), capped at the output sent (max_tokens x 5 = 2,500):
    the one returned choice of 500 tokens (~2,600 bytes of JSON) is charged ~660 completion
    tokens while the upstream billed 2,500, 3.8x less (up to 20x with `best_of: 20`). The four
    unseen candidates are like a reasoning model's hidden thinking, which the gateway charges
    at the output limit when no usage says otherwise (`_reasoning_charged`). Realism: low; it
    needs an upstream that implements `best_of` but reports no usage (legacy vLLM reports it;
    a llama.cpp-style server or a proxy that strips usage does not)."""
    answer = text_completion(
        [{"text": " word" * 500, "index": 0, "logprobs": None, "finish_reason": "length"}]
    )
    gw, secret, _ = await build(whole(answer), key={"budget_tokens": 100_000})
    body = {"model": "m", "prompt": "Tell me", "max_tokens": 500, "best_of": 5, "n": 1}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        assert resp.status == 200, await resp.text()
    row, _ = await charged(gw, secret)
    assert row["completion_tokens"] >= 5 * 500, row["completion_tokens"]  # five billed


# --- Sound ---------------------------------------------------------------------------------


# SOUND: duplicate keys are read alike by the gateway (msgspec: the last wins) and the upstream
# (the body is forwarded through a dict of its fields: one `prompt`, the last), so
# `{"prompt": "a", "prompt": [20 prompts]}` holds and bounds 20 prompts' output.
async def test_duplicate_prompt_keys_are_read_as_the_upstream_reads_them(build: Build) -> None:
    choices = [
        {"text": " word" * 100, "index": i, "logprobs": None, "finish_reason": "length"}
        for i in range(20)
    ]
    gw, secret, up = await build(
        whole(text_completion(choices, usage(60, 2_000))), key={"budget_tokens": 100_000}
    )
    prompts = json.dumps([f"Tell me {i}" for i in range(20)])
    raw = b'{"model": "m", "prompt": "a", "max_tokens": 100, "prompt": ' + prompts.encode() + b"}"
    headers = {**auth(secret), "Content-Type": "application/json"}
    async with gw.post("/v1/completions", data=raw, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    (sent,) = up.requests
    assert sent["prompt"] == json.loads(prompts)
    row, spent = await charged(gw, secret)
    assert (row["completion_tokens"], row["estimated"], spent) == (2_000, 0, 2_060), row


# SOUND: `max_tokens: null` is no limit of the client's: a budgeted key's request goes upstream
# with `default_max_tokens` (4,096), so the hold bounds what it may use.
async def test_a_null_max_tokens_is_replaced_by_the_default_limit(build: Build) -> None:
    answer = text_completion(
        [{"text": " ok", "index": 0, "logprobs": None, "finish_reason": "stop"}], usage(2, 1)
    )
    gw, secret, up = await build(whole(answer), key={"budget_tokens": 100_000})
    body = {"model": "m", "prompt": "hi", "max_tokens": None}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        assert resp.status == 200, await resp.text()
    assert up.requests[0]["max_tokens"] == 4096


# SOUND: 10,000 prompts at 100 tokens each are 1,000,000 output tokens: refused to a
# 100,000-token budget before anything goes upstream (and a list of token lists alike).
@pytest.mark.parametrize(
    "prompt", [[f"p{i}" for i in range(10_000)], [[7] for _ in range(10_000)]], ids=["str", "ids"]
)
async def test_ten_thousand_prompts_are_held_each_output(build: Build, prompt: Any) -> None:
    gw, secret, up = await build(whole({}), key={"budget_tokens": 100_000})
    body = {"model": "m", "prompt": prompt, "max_tokens": 100}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        assert resp.status == 429, await resp.text()
    assert up.requests == []


# SOUND: the same prompts and `n` in a USD budget are priced at their whole output.
async def test_many_prompts_times_n_are_priced_for_a_usd_budget(build: Build) -> None:
    gw, secret, up = await build(whole({}), key={"budget_usd": 1.0}, model=PRICED)
    # 100 prompts x n 4 x 1,000 tokens = 400,000 output tokens at $30/M = $12 > $1.
    body = {"model": "m", "prompt": [f"p{i}" for i in range(100)], "n": 4, "max_tokens": 1000}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        assert resp.status == 429, await resp.text()
    assert up.requests == []


# SOUND: an upstream usage past the bound of several prompts is lowered to it (2 prompts x n 2
# x 50 = 200, under OUTPUT_FLOOR: 1,024), and one within it is charged as reported.
async def test_usage_past_the_bound_of_a_prompt_list_is_lowered(build: Build) -> None:
    choices = [
        {"text": " w", "index": i, "logprobs": None, "finish_reason": "length"} for i in range(4)
    ]
    gw, secret, _ = await build(
        whole(text_completion(choices, usage(4, 900_000))), key={"budget_tokens": 10_000_000}
    )
    body = {"model": "m", "prompt": ["a", "b"], "n": 2, "max_tokens": 50}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        assert resp.status == 200, await resp.text()
    row, _ = await charged(gw, secret)
    assert (row["completion_tokens"], row["estimated"]) == (1024, 1), row


# SOUND: `stream_options: {"include_usage": false}` still asks the upstream for usage; the
# usage chunk is charged and dropped from the client's stream.
async def test_include_usage_false_is_still_accounted(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + data(text_chunk(0, " hi", "stop"))
        + data({**text_chunk(0, ""), "choices": [], "usage": usage(3, 700)})
        + b"data: [DONE]\n\n"
    )
    gw, secret, up = await build(reply, key={"budget_tokens": 100_000})
    body = {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 800,
        "stream": True,
        "stream_options": {"include_usage": False, "continuous_usage_stats": False},
    }
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        got = await resp.read()
    assert b'"usage"' not in got, got
    assert up.requests[0]["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": False,
    }
    row, spent = await charged(gw, secret)
    assert (row["completion_tokens"], spent) == (700, 703), row


# SOUND: a stream of two prompts x n 2 that the upstream breaks after the first prompt's
# choices finished is no complete answer: it is charged as a broken stream (estimated), and the
# client gets an error, not a [DONE].
async def test_a_prompt_list_stream_broken_after_the_first_prompt_is_estimated(
    build: Build,
) -> None:
    reply = STREAM_HEAD + data(text_chunk(0, " a", "length")) + data(text_chunk(1, " b", "length"))
    gw, secret, up = await build(reply, key={"budget_tokens": 100_000})
    up.hold = False  # the upstream closes the connection: the stream ends, unfinished
    body = {"model": "m", "prompt": ["a", "b"], "n": 2, "max_tokens": 50, "stream": True}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        got = await resp.read()
    assert not got.endswith(b"data: [DONE]\n\n") and b'"error"' in got, got
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1 and row["status"] != 200, row


# SOUND: `echo: true` with `max_tokens: 0` (prompt logprobs, the common use) holds and bounds
# no output beyond OUTPUT_FLOOR, and an answer reporting its prompt is charged it.
async def test_echo_with_zero_max_tokens_is_charged_the_reported_prompt(build: Build) -> None:
    answer = text_completion(
        [{"text": "Tell me", "index": 0, "logprobs": None, "finish_reason": "length"}],
        usage(2, 0),
    )
    gw, secret, _ = await build(whole(answer), key={"budget_tokens": 100_000})
    body = {"model": "m", "prompt": "Tell me", "echo": True, "max_tokens": 0, "logprobs": 1}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        assert resp.status == 200, await resp.text()
    row, spent = await charged(gw, secret)
    assert (row["prompt_tokens"], row["completion_tokens"], spent) == (2, 0, 2), row


# --- Embeddings ------------------------------------------------------------------------------


def embedding_list(count: int, dims: int = 4, reported: dict[str, int] | None = None) -> bytes:
    answer: dict[str, Any] = {
        "object": "list",
        "model": "m-1",
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.5] * dims} for i in range(count)
        ],
    }
    if reported is not None:
        answer["usage"] = reported
    return whole(answer)


# SOUND: 2,048 token-id lists of 60 ids each are 122,880 tokens counted exactly (not at four
# characters a token of their JSON): refused to a 100,000-token budget.
async def test_embedding_token_ids_are_counted_for_admission(build: Build) -> None:
    gw, secret, up = await build(embedding_list(1), key={"budget_tokens": 100_000})
    body = {"model": "m", "input": [[1] * 60 for _ in range(2048)]}
    async with gw.post("/v1/embeddings", json=body, headers=auth(secret)) as resp:
        assert resp.status == 429, await resp.text()
    assert up.requests == []


# SOUND: an embeddings answer without usage, or with more prompt tokens than the body has
# bytes, is charged the gateway's estimate (token ids counted), marked estimated.
@pytest.mark.parametrize(
    "reported", [None, {"prompt_tokens": 10**9, "total_tokens": 10**9}], ids=["none", "absurd"]
)
async def test_embedding_usage_missing_or_absurd_is_estimated(
    build: Build, reported: dict[str, int] | None
) -> None:
    gw, secret, _ = await build(embedding_list(3, reported=reported), key={"budget_tokens": 10**6})
    body = {"model": "m", "input": [[5] * 300, [6] * 300, [7] * 400]}
    async with gw.post("/v1/embeddings", json=body, headers=auth(secret)) as resp:
        assert resp.status == 200, await resp.text()
    row, spent = await charged(gw, secret)
    assert (row["prompt_tokens"], row["estimated"], spent) == (1000, 1, 1000), row


# SOUND: an answer whose vectors ignore the `dimensions` asked for (8 floats for 4) is a 502,
# not relayed to the client.
async def test_embedding_dimensions_and_encoding_are_checked(build: Build) -> None:
    gw, secret, _ = await build(
        embedding_list(1, dims=8, reported={"prompt_tokens": 2, "total_tokens": 2}),
        key={"budget_tokens": 10**6},
    )
    body = {"model": "m", "input": "hello there", "dimensions": 4}
    async with gw.post("/v1/embeddings", json=body, headers=auth(secret)) as resp:
        assert resp.status == 502, await resp.text()


# --- The openai SDK reads every answer -------------------------------------------------------


# SOUND: the SDK parses a legacy completion of several prompts (non-streaming and streamed
# without usage asked: the gateway's usage chunk is dropped) and a base64 embeddings answer.
async def test_the_sdk_reads_completions_and_embeddings(build: Build) -> None:
    choices = [
        {"text": f" t{i}", "index": i, "logprobs": None, "finish_reason": "stop"} for i in range(4)
    ]
    gw, secret, up = await build(
        whole(text_completion(choices, usage(4, 4))), key={"budget_tokens": 100_000}
    )
    async with openai_client(gw, secret) as sdk:
        reply = await sdk.completions.create(model="m", prompt=["a", "b"], n=2, max_tokens=5)
        assert [c.text for c in reply.choices] == [" t0", " t1", " t2", " t3"]
        assert reply.usage is not None and reply.usage.completion_tokens == 4

        up.reply = (
            STREAM_HEAD
            + b"".join(data(text_chunk(i, f" s{i}", "stop")) for i in range(4))
            + data({**text_chunk(0, ""), "choices": [], "usage": usage(4, 4)})
            + b"data: [DONE]\n\n"
        )
        stream = await sdk.completions.create(
            model="m", prompt=["a", "b"], n=2, max_tokens=5, stream=True
        )
        texts = [c.choices[0].text async for c in stream]
        assert texts == [" s0", " s1", " s2", " s3"]

        vector = base64.b64encode(struct.pack("<4f", 0.5, 0.5, 0.5, 0.5)).decode()
        emb = {
            "object": "list",
            "model": "m-1",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }
        up.reply = whole(emb)
        got = await sdk.embeddings.create(model="m", input="hello there")  # asks for base64
        assert got.data[0].embedding == [0.5, 0.5, 0.5, 0.5]


async def _charged_after(
    gw: TestClient[Any, Any], secret: str, rows: int
) -> tuple[list[dict[str, Any]], int]:
    """The usage rows (once `rows` are written) and the tokens the key's budget counts."""
    app = app_of(gw)
    async with asyncio.timeout(NEVER_HANG):
        await app[USAGE_KEY].wait_recorded(rows)
    record = app[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    assert spend is not None
    return await usage_rows(gw), spend.tokens
