"""Attack on 1b13558 (Gemini's largest readable counts, final flag) and 3daffc2 (`_so_far`,
`Call.usage_chunks`, `StreamCheck` counting finishes for n > 1) (helper-102).

Real-shaped Gemini and OpenAI-compatible streams to a key with a token budget. Failing tests
say what is wrong and what should happen; passing ones pin regressions checked here.
Harness: test_attack_accounting3's `build`, tests/raw_upstream, test_attack_accounting8.
"""

from __future__ import annotations

import json
from typing import Any

from tests import test_attack_accounting3
from tests.raw_upstream import STREAM_HEAD, charged, sse
from tests.test_attack_accounting3 import Build
from tests.test_attack_accounting8 import (
    DONE,
    PROMPT_G,
    WORDS,
    chat_body,
    consistent,
    gateway,
    gchunk,
    gusage,
    hang_up_after,
    ochunk,
    ousage,
    post,
    usage_chunks,
    usage_only,
)

build = test_attack_accounting3.build  # the fixture: a gateway over raw TCP upstreams


def payloads(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]


def nchunk(choices: list[tuple[int, str | None, str | None]], obj: str = "chat") -> bytes:
    """One chunk of several choices: (index, content, finish_reason) each."""
    if obj == "chat":
        items = [
            {
                "index": i,
                "delta": {"content": c} if c is not None else {},
                "finish_reason": f,
            }
            for i, c, f in choices
        ]
        kind = "chat.completion.chunk"
    else:
        items = [
            {"index": i, "text": c or "", "logprobs": None, "finish_reason": f}
            for i, c, f in choices
        ]
        kind = "text_completion"
    return sse({"id": "c1", "object": kind, "created": 1, "model": "m-1", "choices": items})


# --- OpenAI-compatible ------------------------------------------------------------------------


# SOUND: a normal OpenAI stream (role chunk, content, finish, usage chunk with choices [],
# [DONE]) is charged its usage exactly and the client's usage chunk is that usage.
async def test_openai_normal_stream_is_exact(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + sse(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m-1",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
        + b"".join(ochunk(WORDS[i : i + 100]) for i in range(0, 1_000, 100))
        + ochunk(None, "stop")
        + usage_only(ousage(300, 250))
        + DONE
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 300, 250)
    consistent(row, spend)
    assert usage_chunks(data) == [ousage(300, 250)]


# SOUND: Azure's prompt_filter_results chunk (choices [], no usage) first and a content
# filter result on each chunk do not change the charge: exact.
async def test_azure_prompt_filter_results_stream_is_exact(build: Build) -> None:
    head = sse(
        {
            "id": "",
            "object": "",
            "created": 0,
            "model": "",
            "choices": [],
            "prompt_filter_results": [
                {
                    "prompt_index": 0,
                    "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}},
                }
            ],
        }
    )
    reply = (
        STREAM_HEAD
        + head
        + ochunk("hello")
        + ochunk(None, "stop")
        + usage_only(ousage(300, 40))
        + DONE
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 300, 40)
    consistent(row, spend)
    assert usage_chunks(data)[-1]["completion_tokens"] == 40


# SOUND: n = 2, both choices finishing in one chunk, the usage chunk, then the upstream
# closes without [DONE] (all in one read, the `_relay_run` / `see_run` path): complete, no
# error event, charged exactly.
async def test_openai_n2_both_finish_in_one_chunk_without_done(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + nchunk([(0, "a", None), (1, "b", None)])
        + nchunk([(0, None, "stop"), (1, None, "stop")])
        + usage_only(ousage(300, 12))
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body(n=2))
    assert b'"error"' not in data, data[-300:]
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 300, 12)
    consistent(row, spend)


# SOUND: n = 2, each choice finishing in its own chunk, no usage asked, no [DONE]: complete.
async def test_openai_n2_separate_finishes_without_done_or_usage(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + nchunk([(0, "a", None)])
        + nchunk([(1, "b", None)])
        + nchunk([(1, None, "length")])
        + nchunk([(0, None, "stop")])
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    body = chat_body(n=2)
    del body["stream_options"]
    data = await post(gw, secret, "/v1/chat/completions", body)
    assert b'"error"' not in data, data[-300:]


# SOUND: a legacy /v1/completions stream with n = 2: both finish, usage, [DONE]: exact.
async def test_completions_n2_stream_is_exact(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + nchunk([(0, "x", None)], "text")
        + nchunk([(1, "y", None)], "text")
        + nchunk([(0, "", "stop"), (1, "", "stop")], "text")
        + sse(
            {
                "id": "c1",
                "object": "text_completion",
                "created": 1,
                "model": "m-1",
                "choices": [],
                "usage": ousage(20, 8),
            }
        )
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    body = {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 50,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    data = await post(gw, secret, "/v1/completions", body)
    assert b'"error"' not in data, data[-300:]
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 20, 8)
    consistent(row, spend)


# Usage carried on the finishing chunk itself (choices not empty: several servers do), then
# [DONE]: exact.
async def test_openai_usage_on_the_finish_chunk_is_exact(build: Build) -> None:
    reply = STREAM_HEAD + ochunk("hello") + ochunk(None, "stop", usage=ousage(300, 30)) + DONE
    gw, secret, _ = await gateway(build, "openai", reply)
    await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 300, 30)
    consistent(row, spend)


# The same, the upstream closing right after it without [DONE].
async def test_openai_usage_on_the_finish_chunk_without_done(build: Build) -> None:
    reply = STREAM_HEAD + ochunk("hello") + ochunk(None, "stop", usage=ousage(300, 30))
    gw, secret, _ = await gateway(build, "openai", reply)
    await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 300, 30)
    consistent(row, spend)


# WRONG (low; regression of 3daffc2): a complete answer of no output (the role chunk with
# `content: ""`, a finish, a usage chunk of 0 output, [DONE]: a model that stops at once, an
# output content filter) is taken as "0 output after streamed output" by `pipeline._so_far`,
# because `call.chunks` counts the role chunk and the empty finish chunk (and Azure's
# prompt_filter_results chunk) as output: the row is marked estimated and floored at the
# gateway's estimate, prompt 300 -> 307, output 0 -> 2. Right: only chunks carrying content
# (text, tool calls, refusal) make a count of 0 implausible; a complete stream ([DONE]) whose
# chunks held no content is charged its usage exactly.
async def test_openai_empty_answer_zero_output(build: Build) -> None:
    role = sse(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m-1",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        }
    )
    reply = STREAM_HEAD + role + ochunk(None, "stop") + usage_only(ousage(300, 0)) + DONE
    gw, secret, _ = await gateway(build, "openai", reply)
    await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 300, 0)
    consistent(row, spend)


# A JSON (non-stream) answer of 0 output tokens: `_so_far` does not apply: exact.
async def test_json_answer_zero_output_is_exact(build: Build) -> None:
    answer = json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": "m-1",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ""},
                    "finish_reason": "stop",
                }
            ],
            "usage": ousage(300, 0),
        }
    ).encode()
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(answer)).encode()
        + b"\r\nConnection: close\r\n\r\n"
    )
    gw, secret, _ = await gateway(build, "openai", head + answer)
    body = chat_body()
    del body["stream"], body["stream_options"]
    await post(gw, secret, "/v1/chat/completions", body)
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 300, 0)
    consistent(row, spend)


# --- Gemini -----------------------------------------------------------------------------------


def gcands(cands: list[dict[str, Any]], usage: dict[str, Any] | None, **more: Any) -> bytes:
    payload: dict[str, Any] = {"candidates": cands, "modelVersion": "m-1", "responseId": "r1"}
    if usage is not None:
        payload["usageMetadata"] = usage
    return sse(payload | more)


def gcand(index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
    cand: dict[str, Any] = {"index": index}
    if text is not None:
        cand["content"] = {"role": "model", "parts": [{"text": text}]}
    if finish:
        cand["finishReason"] = finish
    return cand


# SOUND: n = 2 candidates, usage on every chunk rising: exact, the usage chunk the same.
async def test_gemini_two_candidates_exact(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + gcands([gcand(0, "a"), gcand(1, "b")], gusage(PROMPT_G, 10))
        + gcands([gcand(0, "c", "STOP"), gcand(1, "d", "STOP")], gusage(PROMPT_G, 20))
    )
    gw, secret, _ = await gateway(build, "gemini", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body(n=2))
    assert b'"error"' not in data, data[-300:]
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, PROMPT_G, 20)
    consistent(row, spend)
    assert usage_chunks(data)[-1]["completion_tokens"] == 20


# SOUND: a prompt blocked by safety (promptFeedback, no candidates, usage of the prompt only):
# charged the prompt exactly, 0 output, and the client gets the usage chunk.
async def test_gemini_blocked_prompt_exact(build: Build) -> None:
    reply = STREAM_HEAD + sse(
        {
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": PROMPT_G, "totalTokenCount": PROMPT_G},
            "modelVersion": "m-1",
        }
    )
    gw, secret, _ = await gateway(build, "gemini", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, PROMPT_G, 0)
    consistent(row, spend)
    assert usage_chunks(data)[-1]["prompt_tokens"] == PROMPT_G
    assert any(
        c.get("finish_reason") == "content_filter" for p in payloads(data) for c in p["choices"]
    )


# SOUND: an image part (inlineData) with its candidate tokens: exact.
async def test_gemini_image_part_exact(build: Build) -> None:
    image = {
        "index": 0,
        "finishReason": "STOP",
        "content": {
            "role": "model",
            "parts": [{"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}],
        },
    }
    reply = STREAM_HEAD + gcands([image], gusage(PROMPT_G, 1290))
    gw, secret, _ = await gateway(build, "gemini", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, PROMPT_G, 1290)
    consistent(row, spend)
    assert usage_chunks(data)[-1]["completion_tokens"] == 1290


# SOUND: a Gemini stream with no usageMetadata at all: estimated, no usage chunk.
async def test_gemini_no_usage_is_estimated(build: Build) -> None:
    reply = STREAM_HEAD + gchunk("hello", None) + gchunk(" world", None, "STOP")
    gw, secret, _ = await gateway(build, "gemini", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body())
    assert b'"error"' not in data, data[-300:]
    row, spend = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] >= 2, row
    consistent(row, spend)
    assert usage_chunks(data) == []


# Thoughts rising, then the answer; cached content on the last chunks only.
async def test_gemini_cache_only_on_last_chunk_exact(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + gchunk("think", gusage(PROMPT_G, None, thoughtsTokenCount=50), thought=True)
        + gchunk("ans", gusage(PROMPT_G, 5, thoughtsTokenCount=80))
        + gchunk(
            "", gusage(PROMPT_G, 9, thoughtsTokenCount=80, cachedContentTokenCount=512), "STOP"
        )
    )
    gw, secret, _ = await gateway(build, "gemini", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (
        0,
        PROMPT_G,
        89,
    ), row
    consistent(row, spend)
    assert usage_chunks(data)[-1]["completion_tokens"] == 89


# n = 2: the upstream repeats choice 0's finish (in one read, and read by read) and closes
# without [DONE] before choice 1 finished: the answer was cut short, so the client gets an
# error event, not a clean end (finishes were counted, not their choices).
async def test_openai_n2_repeated_finish_of_one_choice_is_not_the_end(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + nchunk([(0, "a", None), (1, "b", None)])
        + nchunk([(0, None, "stop")])
        + nchunk([(0, None, "stop")])
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    body = chat_body(n=2)
    del body["stream_options"]
    data = await post(gw, secret, "/v1/chat/completions", body)
    assert b'"error"' in data, data[-300:]
    assert b"before the answer was complete" in data


# The same, the repeated finish read one event at a time (a usage on the chunk makes it one
# `see` looks at alone): still cut short.
async def test_openai_n2_repeated_finish_with_usage_is_not_the_end(build: Build) -> None:
    repeated = json.loads(nchunk([(0, None, "stop")])[6:])
    repeated["usage"] = ousage(300, 12)
    reply = (
        STREAM_HEAD
        + nchunk([(0, "a", None), (1, "b", None)])
        + nchunk([(0, None, "stop")])
        + sse(repeated)
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body(n=2))
    assert b"before the answer was complete" in data, data[-300:]


# A Gemini stream that counts only on its first chunk (a proxy that drops later
# usageMetadata), cut after three more chunks of 250 tokens each: the count so far plus what
# streamed after it at four characters a token (1,000), not the count and a token a chunk.
async def test_gemini_cut_counts_what_streamed_after_the_last_count(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + gchunk(WORDS, gusage(PROMPT_G, 250))
        + gchunk(WORDS, None)
        + gchunk(WORDS, None)
        + gchunk(WORDS + "MARK", None)
    )
    gw, secret, up = await gateway(build, "gemini", reply, hold=True)
    await hang_up_after(gw, secret, "/v1/chat/completions", chat_body(), up, b"MARK")
    row, spend = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["prompt_tokens"] == PROMPT_G, row
    assert row["completion_tokens"] == 250 + 750 + 1, row  # ("MARK": one token more)
    consistent(row, spend)


# The same ended without a final count (the upstream closed after them): accounted as cut.
# Thoughts after the count go to the output too. A count on a chunk holds that chunk's own
# parts: a stream counted on every chunk but the last is charged its last count and the
# last chunk only.
async def test_gemini_unfinished_count_adds_text_and_thoughts_after_it(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + gchunk(WORDS, gusage(PROMPT_G, 250))
        + gchunk(WORDS, gusage(PROMPT_G, 500))
        + gchunk(WORDS, None, thought=True)
        + gchunk(WORDS, None, "STOP")
    )
    gw, secret, _ = await gateway(build, "gemini", reply)
    await post(gw, secret, "/v1/chat/completions", chat_body())
    row, spend = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] == 500 + 250 + 250, row
    consistent(row, spend)
