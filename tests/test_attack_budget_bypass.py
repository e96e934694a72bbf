"""A hostile client with one budgeted key gets more out of the upstream than its budget allows.

Each failing test here is a way a key's token or USD budget is charged less than the upstream
bills the operator for the key's request (or a documented limit is not sent upstream), with
the overspend worked out in its comment. The passing tests pin properties that hold and that
no other test covers.

The upstreams are raw TCP servers (`RawUp`): each writes the bytes a real provider would, then
waits for the gateway to close the connection (the client hung up), so every wait is on an
event, never on time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, RoutingSettings, Target
from gateway.state import GATE_KEY, KEYS_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    provider_config,
    start_gateway,
)
from tests.raw_upstream import RawUpstream as RawUp, auth, charged, cut_after

UPSTREAM_KEY = "sk-upstream-0123456789abcdefghij"
BASE_PATH = {"openai": "/v1", "anthropic": "", "gemini": ""}

# A prompt of 2,000 CJK characters: 6,000 bytes of UTF-8, which the gateway's "likely" estimate
# (four characters a token) puts at ~500 tokens; real tokenizers spend about a token a
# character on such text (Anthropic and Gemini report what they counted).
CJK = "漢字仮名交じり文" * 250
CJK_TOKENS = 2_000


def head(content_type: str = "text/event-stream") -> bytes:
    """A 200 whose body ends when the connection closes."""
    return f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n".encode()


def whole(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )


def data(payload: Any, event: str | None = None) -> bytes:
    line = b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
    return (b"event: " + event.encode() + b"\n" + line) if event else line


Build = Callable[..., Awaitable[tuple[TestClient[Any, Any], str, RawUp]]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(
        kind: str,
        reply: bytes,
        *,
        key: dict[str, Any],
        model: dict[str, Any] | None = None,
        routing: RoutingSettings | None = None,
        **provider: Any,
    ) -> tuple[TestClient[Any, Any], str, RawUp]:
        up = RawUp(reply)
        await up.start()
        assert up.server is not None
        servers.append(up.server)
        cfg = provider_config(
            kind,
            name="up",
            base_url=f"http://127.0.0.1:{up.port}{BASE_PATH[kind]}",
            api_keys=(UPSTREAM_KEY,),
            **provider,
        )
        m = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),), **(model or {}))
        extra = {"routing": routing} if routing is not None else {}
        settings = make_settings(providers=(cfg,), models=(m,), **extra)
        gw = await start_gateway(aiohttp_client, settings)
        return gw, await create_key(gw, **key), up

    yield make
    for server in servers:
        server.close()


# --- Streams the client cuts: the upstream's own counts so far are thrown away ----------------


async def test_a_cut_gemini_stream_is_charged_a_token_a_chunk_not_the_usage_it_reported(
    build: Build,
) -> None:
    """WRONG: Gemini sends `usageMetadata` with every stream chunk, counting the whole answer
    so far (`GeminiStream.usage` keeps it), but a client that hangs up before the upstream
    closes the stream is charged the gateway's estimate instead: the prompt at four characters
    a token and ONE completion token per Gemini chunk, though a Gemini chunk carries dozens of
    tokens. Here one chunk of 1,500 reported output tokens (and a 2,000-token prompt) is charged
    1 output token and 507 prompt tokens: the key pays 508 of the 3,500 Gemini bills, every
    time, and the next request is admitted against a budget that never saw the rest (a
    10,000-token budget yields ~65,000 billed tokens). keys.md promises: "a stream the client
    cuts off is charged for what was generated"; the upstream told the gateway exactly that."""
    meta = {"promptTokenCount": CJK_TOKENS, "candidatesTokenCount": 1_500}
    meta["totalTokenCount"] = CJK_TOKENS + 1_500
    first = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": "word " * 1_200}]}}],
        "usageMetadata": meta,
        "modelVersion": "m-1",
        "responseId": "r1",
    }
    gw, secret, up = await build("gemini", head() + data(first), key={"budget_tokens": 10_000})
    body = {"model": "m", "messages": [{"role": "user", "content": CJK}], "stream": True}
    await cut_after(gw, secret, "/v1/chat/completions", body, b"word word")
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, spent = await charged(gw, secret)
    assert row["status"] == 499
    # Gemini billed 3,500 tokens by its own running count; the key is charged 508.
    assert (row["prompt_tokens"], row["completion_tokens"]) == (CJK_TOKENS, 1_500), row
    assert spent >= CJK_TOKENS + 1_500, spent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_cut_anthropic_stream_ignores_the_input_count_of_message_start(
    build: Build, path: str
) -> None:
    """WRONG: Anthropic's `message_start` reports the exact `input_tokens` (cache reads and
    writes too) before any content; a client that hangs up before `message_delta` (which
    carries only the output count) is charged the prompt's estimate instead (four characters a
    token) and one output token per `content_block_delta`, though each delta holds several
    tokens. Both on the translated chat path and on the native `/v1/messages` pass-through.
    Here 2,000 input tokens and two deltas of ~150 tokens each are charged 507 + 2: the key
    pays under 20 % of what Anthropic bills for the cut request (cached prompts make it worse:
    a 100k-token cache write reported in `message_start` is charged as the few hundred
    characters the client sent). Documented: a cut stream "is charged for what was generated"
    (keys.md), and the prompt estimate is only for "when the upstream never reported usage"
    (operations.md); here it did."""
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "m-1",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": CJK_TOKENS, "output_tokens": 1},
        },
    }
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }

    def delta(text: str) -> bytes:
        payload = {"type": "content_block_delta", "index": 0}
        payload["delta"] = {"type": "text_delta", "text": text}  # type: ignore[assignment]
        return data(payload, "content_block_delta")

    reply = (
        head()
        + data(start, "message_start")
        + data(block, "content_block_start")
        + delta("alpha " * 150)
        + delta("omega " * 150)
    )
    gw, secret, up = await build("anthropic", reply, key={"budget_tokens": 10_000})
    body = {
        "model": "m",
        "max_tokens": 1_000,
        "messages": [{"role": "user", "content": CJK}],
        "stream": True,
    }
    await cut_after(gw, secret, path, body, b"omega omega")
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, spent = await charged(gw, secret)
    assert row["status"] == 499
    assert row["prompt_tokens"] == CJK_TOKENS, row  # what message_start said
    assert spent >= CJK_TOKENS + 300, spent


async def test_a_reasoning_stream_cut_before_its_usage_chunk_pays_no_reasoning(
    build: Build,
) -> None:
    """WRONG: an OpenAI reasoning model thinks first (hidden reasoning tokens, billed as
    output) and only then streams its visible answer; the usage chunk, the only place the
    reasoning count appears, comes after the finish chunk. A client that reads the answer up to
    its `finish_reason` and hangs up before the usage chunk is charged one token per visible
    chunk and nothing for the reasoning. Here the upstream reasoned 8,000 tokens and wrote 3
    chunks: the key is charged 4 output tokens of the 8,003 billed (a 10,000-token budget
    buys ~20 such answers at `reasoning_effort: high` instead of one). The output limit the
    request held (its `max_completion_tokens`, what the upstream may have spent) is given back
    unused. Documented: "a stream the client cuts off is charged for what was generated"."""
    head_ = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m-1"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return data(head_ | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    reply = (
        head()
        + chunk({"role": "assistant", "content": "The"})
        + chunk({"content": " answer"})
        + chunk({"content": " is 42."})
        + chunk({}, "stop")
        # ... and then, once the connection is still open, the usage chunk that would say
        # completion_tokens 8003 (reasoning_tokens 8000): never read, the client left.
    )
    gw, secret, up = await build(
        "openai", reply, key={"budget_tokens": 10_000}, model={"reasoning": True}
    )
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "think hard"}],
        "max_completion_tokens": 9_000,
        "reasoning_effort": "high",
        "stream": True,
    }
    await cut_after(gw, secret, "/v1/chat/completions", body, b'"finish_reason": "stop"')
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, spent = await charged(gw, secret)
    assert row["status"] == 499 and row["estimated"], row
    # The upstream billed 8,003 output tokens; the key is charged 4 (plus a few of prompt).
    assert row["completion_tokens"] >= 8_000, row
    assert spent >= 8_000, spent


# --- Output limits the docs say are sent upstream, but are not -----------------------------


async def test_a_budgeted_keys_legacy_completion_gets_no_output_limit_upstream(
    build: Build,
) -> None:
    """WRONG: configuration.md / keys.md: for "a key with a budget or tokens per minute when
    the request sets none", the provider's `default_max_tokens` "is sent upstream as its
    limit", so that what admission holds bounds what the request can use. Chat requests get it
    (`ChatCall.cap_output`); `/v1/completions` does not (`CompletionCall` has no `cap_output`,
    and `_completion_fields` only fills in a model's `max_tokens`). Admission holds 4,096
    output tokens, the body goes upstream without `max_tokens`, and an OpenAI-compatible
    server with no default limit of its own (llama.cpp's `n_predict = -1`, Ollama) writes until
    its context ends. The usage bound (`output_ceiling`) is then UNBOUNDED too, so all of it
    is charged after the fact: two such requests admitted at once against a 10,000-token budget
    each use e.g. 30,000 tokens, 60,000 in all, overspending by 50,000, past the documented
    bound of one request's use (30,000)."""
    answer = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m-1",
        "choices": [{"text": " once upon a time", "index": 0, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 30_000, "total_tokens": 30_003},
    }
    gw, secret, up = await build(
        "openai", whole(json.dumps(answer).encode()), key={"budget_tokens": 10_000}
    )
    async with gw.post(
        "/v1/completions", json={"model": "m", "prompt": "Tell me"}, headers=auth(secret)
    ) as resp:
        assert resp.status == 200, await resp.text()
    (sent,) = up.requests
    assert sent.get("max_tokens") == 4096, sent  # the documented limit for budgeted keys
    row, spent = await charged(gw, secret)
    assert spent <= 4096 + 3 + 4096, (row, spent)  # held 4,099; charged 30,003


async def test_a_background_response_passed_through_is_charged_no_output(build: Build) -> None:
    """WAS WRONG: `/v1/responses` with `background: true` is refused on translated routes but
    was relayed to a `responses_api` upstream. OpenAI answers at once with a `queued` response
    (no usage) and then generates the whole answer on its own, billing it to the operator's
    account; the client reads it later with `previous_response_id` or OpenAI's webhooks.
    The gateway charged the queued answer as an estimated row: the prompt's estimate and ZERO
    output tokens, and gave back the output limit it held. So every background request was
    free of output: at `max_output_tokens: 4000` and a 10,000-token budget, a loop of
    background requests ran the budget down by 11 tokens each while the upstream billed 4,000
    each (~360x). Documented: a budget is overspent by at most one request's use.

    Fixed by refusal: a background response's usage comes after the answer, from the upstream,
    where the gateway cannot count it, so a key with a budget (or tokens per minute) gets a 400
    naming `background`; nothing reaches the upstream and nothing is charged. (A key without
    either still has it relayed: tests/test_responses_passthrough.py.)"""
    queued = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "queued",
        "background": True,
        "model": "m-1",
        "output": [],
        "usage": None,
    }
    gw, secret, up = await build(
        "openai",
        whole(json.dumps(queued).encode()),
        key={"budget_tokens": 10_000},
        responses_api=True,
    )
    body = {"model": "m", "input": "write a novel", "background": True, "max_output_tokens": 4_000}
    async with gw.post("/v1/responses", json=body, headers=auth(secret)) as resp:
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
    assert error["param"] == "background", error
    assert error["type"] == "invalid_request_error", error
    assert "cannot count" in error["message"], error
    assert up.requests == []  # nothing reached the upstream
    record = app_of(gw)[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app_of(gw)[GATE_KEY].spending(record)
    assert spend is None or spend.tokens == 0, spend  # nothing charged (None: nothing ever)


# --- Attempts that time out: the upstream has the prompt (and may be generating), no charge ----


async def test_attempts_that_time_out_are_charged_nothing_though_the_upstream_had_the_prompt(
    build: Build,
) -> None:
    """WRONG: a non-streaming request whose upstream does not answer within the provider's
    `total_timeout` is retried (`max_attempts`, 3 by default) and ends in a 504, and none of its
    attempts is charged: `_use` forgets each attempt, and `_account` estimates nothing when no
    byte came and the client did not hang up. Yet each attempt delivered the whole prompt, and
    an upstream that is still generating when the gateway gives up (a long answer, a reasoning
    model thinking past the timeout) bills it all: a client hanging up at the same moment is
    charged the prompt's estimate ("the upstream already has the prompt"), a timeout nothing.
    A client provokes it at will with a large `max_tokens` (or `reasoning_effort: high`) on a
    slow model: here three attempts of a ~1,000-token prompt cost the key 0 tokens; with a
    100k-token prompt and a 4,096-token answer generated each time, ~312k tokens billed per
    request, against a budget that never moves, so a key spends without limit."""
    gw, secret, up = await build(
        "openai",
        b"",  # never answers
        key={"budget_tokens": 10_000},
        routing=RoutingSettings(max_attempts=3, backoff_initial=0.01, backoff_max=0.01),
        read_timeout=0.2,
        total_timeout=0.2,
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "word " * 800}]}
    async with gw.post("/v1/chat/completions", json=body, headers=auth(secret)) as resp:
        assert resp.status == 504, await resp.text()
    assert len(up.requests) == 3  # the prompt went upstream three times
    row, spent = await charged(gw, secret)
    assert spent >= 3 * 1_000, (row, spent)  # charged 0


# --- What holds ----------------------------------------------------------------------------


async def test_a_cut_openai_stream_without_reasoning_is_charged_its_chunks(build: Build) -> None:
    """HOLDS: the same cut on a plain OpenAI model (one token a chunk, as OpenAI streams) is
    charged what was streamed: three chunks, three completion tokens, row 499 estimated, and
    the budget counts exactly the row."""
    head_ = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m-1"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return data(head_ | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    reply = head() + chunk({"content": "a"}) + chunk({"content": "b"}) + chunk({"content": "c"})
    gw, secret, up = await build("openai", reply, key={"budget_tokens": 10_000})
    body = {"model": "m", "messages": [{"role": "user", "content": "abc"}], "stream": True}
    await cut_after(gw, secret, "/v1/chat/completions", body, b'"c"')
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, spent = await charged(gw, secret)
    assert (row["status"], row["estimated"], row["completion_tokens"]) == (499, 1, 3)
    assert spent == row["prompt_tokens"] + row["completion_tokens"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"input": "hi"}),
        ("/v1/messages", {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
    ids=["responses", "messages", "chat"],
)
async def test_an_unpriced_provider_model_is_refused_to_a_usd_budget_on_every_endpoint(
    build: Build, path: str, body: dict[str, Any]
) -> None:
    """HOLDS: a USD-budgeted key allowed `up/*` asking for `up/<a model no price list
    knows>` (or one with a trailing space, or another case than the list's) is refused 403
    `model_price_unknown` on chat, Responses (pass-through upstream) and Messages alike,
    and nothing reaches the upstream."""
    gw, secret, up = await build(
        "openai",
        whole(b"{}"),
        key={"budget_usd": 1.0, "models": ["up/*"]},
        responses_api=True,
    )
    for model in ("up/my-unpriced-model", "up/gpt-4o-mini ", "up/gpt-4o-mini-XYZ"):
        async with gw.post(path, json={"model": model, **body}, headers=auth(secret)) as resp:
            assert resp.status == 403, (model, await resp.text())
            assert "has no known price" in await resp.text()
    assert up.requests == []


async def test_a_glob_allow_list_cannot_reach_another_gemini_model_through_its_path(
    build: Build,
) -> None:
    """HOLDS: Gemini puts the model in the URL path; a key allowed `up/gemini-2.0-flash*`
    asking for `up/gemini-2.0-flash/../gemini-2.5-pro` (the glob's `*` matches `/`) reaches
    only a path that keeps the slash quoted, never `models/gemini-2.5-pro`."""
    gw, secret, up = await build(
        "gemini", whole(b"{}"), key={"models": ["up/gemini-2.0-flash*"], "budget_tokens": 10_000}
    )
    model = "up/gemini-2.0-flash/../gemini-2.5-pro"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with gw.post("/v1/chat/completions", json=body, headers=auth(secret)) as resp:
        await resp.read()
    (path,) = up.paths
    assert path.startswith("/v1beta/models/gemini-2.0-flash%2F..%2Fgemini-2.5-pro:"), path


async def test_a_legacy_completion_of_several_prompts_is_charged_each_prompts_output(
    build: Build,
) -> None:
    """A legacy completion given a list of prompts is answered `n` choices for each prompt,
    each up to `max_tokens`: twenty prompts at 100 tokens make 2,000 output tokens, all
    billed upstream. The usage bound took only `n` choices (`CompletionRequest.choices`), so
    1,024 of the 2,000 reported were charged (`OUTPUT_FLOOR`), and of 20 prompts at 4,000
    tokens, 4,000 of 80,000: a twentieth of the output."""
    choices = [
        {"text": " word" * 100, "index": i, "logprobs": None, "finish_reason": "length"}
        for i in range(20)
    ]
    answer = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m-1",
        "choices": choices,
        "usage": {"prompt_tokens": 60, "completion_tokens": 2_000, "total_tokens": 2_060},
    }
    gw, secret, _ = await build(
        "openai", whole(json.dumps(answer).encode()), key={"budget_tokens": 100_000}
    )
    body = {"model": "m", "prompt": [f"Tell me {i}" for i in range(20)], "max_tokens": 100}
    async with gw.post("/v1/completions", json=body, headers=auth(secret)) as resp:
        assert resp.status == 200, await resp.text()
    row, _ = await charged(gw, secret)
    assert (row["completion_tokens"], row["estimated"]) == (2_000, 0), row
