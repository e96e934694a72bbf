"""The stream check of a read of whole events (`StreamCheck.see_run`) against the event by
event path, attacked with what a hostile upstream can put in a chunk: usage, error and
finish_reason in odd places and forms, duplicate keys, JSON that spans events, deep nesting,
bytes that are not text. Whatever it sends, the client gets the same bytes and the usage row
is the same whether the body comes in one read or a byte per read (the harness of
test_attack_runs), and every event the client gets is one JSON object."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tests.conftest import openai_client, usage_rows
from tests.test_attack_runs import (
    CHAT_BODY,
    DONE,
    STOP,
    USAGE,
    Build,
    both_ways,
    build,
    chat_both_ways,
    check_framing,
)
from tests.test_attack_upstream import UPSTREAM_KEY, chunk, sends, sse, until_close

__all__ = ["build"]  # the fixture, used here by name


def finishing(reason: bytes) -> bytes:
    """A chunk whose choice's finish_reason is `reason` (raw JSON)."""
    return STOP.replace(b'"finish_reason":"stop"', b'"finish_reason":' + reason)


USAGE_BODY = b'{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}'
NESTED = chunk("a")[:-3] + b',"usage":%b}]}' % USAGE_BODY  # usage inside a choice
DEEP = b'{"a":' * 5000 + b"1" + b"}" * 5000

# Each: the upstream's whole body.
CASES = {
    # finish_reason in odd forms, then a stream cut short (no [DONE]): finished or not, the
    # same either way.
    "finish-empty-string": sse(chunk("a"), finishing(b'""')),
    "finish-zero": sse(chunk("a"), finishing(b"0")),
    "finish-false": sse(chunk("a"), finishing(b"false")),
    "finish-true": sse(chunk("a"), finishing(b"true")),
    "finish-object": sse(chunk("a"), finishing(b'{"a":"stop"}')),
    "finish-empty-object": sse(chunk("a"), finishing(b"{}")),
    "finish-list": sse(chunk("a"), finishing(b'["stop"]')),
    "finish-spaced": sse(chunk("a"), STOP.replace(b'"finish_reason":', b'"finish_reason" : ')),
    "finish-escaped": sse(chunk("a"), STOP.replace(b'"stop"', b'"\\u0073top"')),
    "finish-nested-in-delta": sse(
        chunk("a"), chunk("b").replace(b'"delta":{', b'"delta":{"finish_reason":"stop",')
    ),
    "finish-top-level": sse(chunk("a"), chunk("b")[:-1] + b',"finish_reason":"stop"}'),
    "finish-in-a-string": sse(chunk('"finish_reason":"stop"'), chunk("b")),
    "finish-in-a-second-choice": sse(
        chunk("a"), chunk("b").replace(b"}]}", b'},{"index":1,"finish_reason":"length"}]}')
    ),
    "choices-not-a-list": sse(chunk("a"), b'{"choices":{"finish_reason":"stop"}}', STOP, DONE),
    "choices-of-numbers": sse(chunk("a"), b'{"choices":[1,2]}', STOP, DONE),
    # usage in odd places and forms
    "usage-zero": sse(chunk("a"), chunk("b")[:-1] + b',"usage":0}', STOP, USAGE, DONE),
    "usage-list": sse(chunk("a"), chunk("b")[:-1] + b',"usage":[]}', STOP, USAGE, DONE),
    "usage-string": sse(chunk("a"), chunk("b")[:-1] + b',"usage":"{}"}', STOP, USAGE, DONE),
    "usage-nested-in-a-choice": sse(chunk("a"), NESTED, STOP, USAGE, DONE),
    "usage-nested-after-usage": sse(chunk("a"), USAGE, NESTED, STOP, DONE),
    "usage-then-null": sse(chunk("a"), STOP, USAGE[:-1] + b',"usage":null}', DONE),
    "usage-null-then-usage": sse(
        chunk("a"), STOP, b'{"usage":null,"choices":[],"usage":%b}' % USAGE_BODY, DONE
    ),
    "usage-spaced": sse(chunk("a"), STOP, USAGE.replace(b'"usage":', b'"usage" :\t'), DONE),
    "usage-with-a-nested-null": sse(chunk("a"), STOP, USAGE[:-1] + b',"x":{"usage":null}}', DONE),
    "usage-null-spaced": sse(chunk("a")[:-1] + b',"usage": null}', STOP, USAGE, DONE),
    "usage-unreadable": sse(
        chunk("a"), STOP, b'{"choices":[],"usage":{"prompt_tokens":"x"}}', DONE
    ),
    # error in odd places and forms
    "error-null-then-error": sse(chunk("a"), b'{"error":null,"error":{"message":"late"}}', DONE),
    "error-then-null": sse(chunk("a"), b'{"error":{"message":"gone"},"error":null}', STOP, DONE),
    "error-empty": sse(chunk("a"), b'{"error":{}}', STOP, DONE),
    "error-string": sse(chunk("a"), b'{"error":"overloaded"}', STOP, DONE),
    "error-late-in-a-chunk": sse(
        chunk("a"), chunk("b")[:-1] + b',"error":{"message":"x"}}', STOP, DONE
    ),
    "error-with-usage-inside": sse(
        chunk("a"), b'{"error":{"message":"overloaded","usage":%b},"choices":[]}' % USAGE_BODY, DONE
    ),
    # JSON that is not one object per event
    "array-across-events": sse(chunk("a"), b"[" + chunk("b"), chunk("c") + b"]", STOP, DONE),
    "object-across-events": sse(chunk("a"), b'{"a":', b"1}", STOP, DONE),
    "string-event": sse(chunk("a"), b'"text"', STOP, DONE),
    "number-event": sse(chunk("a"), b"1", STOP, DONE),
    "null-event": sse(chunk("a"), b"null", STOP, DONE),
    "array-event": sse(chunk("a"), b"[]", STOP, DONE),
    "two-objects-no-comma": sse(chunk("a"), chunk("b") + chunk("c"), STOP, DONE),
    "trailing-garbage": sse(chunk("a"), chunk("b") + b" x", STOP, DONE),
    "deeply-nested": sse(chunk("a"), DEEP, STOP, DONE),
    "deeply-nested-array": sse(chunk("a"), b"[" * 100_000, STOP, DONE),
    "escaped-separator-in-a-string": sse(chunk("a"), chunk(b"\\n\\ndata: {}\\n\\n"), STOP, DONE),
    "raw-separator-in-a-string": sse(chunk("a"), chunk(b"x\n\ndata: y"), STOP, DONE),
    "done-in-the-middle-of-many": sse(*[chunk("x")] * 50, DONE, *[chunk("y")] * 50, STOP, DONE),
    "done-in-a-string-then-done": sse(chunk("a"), b'{"x":"[DONE]"}', STOP, DONE),
    "many-tiny-events": sse(*[b"{}"] * 5000, STOP, DONE),
    "empty-object-events": sse(b"{}", b"{ }", b" {}", b"{} ", STOP, DONE),
    # bytes that are not plain text
    "bom-first": b"\xef\xbb\xbf" + sse(chunk("a"), STOP, DONE),
    "bom-in-data": sse(chunk("a"), b"\xef\xbb\xbf" + chunk("b"), STOP, DONE),
    "nul-raw": sse(chunk("a"), chunk(b"x\x00y"), STOP, DONE),
    "nul-escaped": sse(chunk("a"), chunk(b"x\\u0000y"), STOP, DONE),
    "nul-between-events": sse(chunk("a")) + b"\x00" + sse(STOP, DONE),
    "non-ascii": sse(chunk("h\u00e9llo \u2713 \U0001f600"), STOP, USAGE, DONE),
    "invalid-utf8-first": sse(chunk(b"\xc3("), STOP, USAGE, DONE),
    "lone-surrogate-escape": sse(chunk(b"\\ud800"), STOP, DONE),
    "overlong-utf8": sse(chunk(b"\xc0\xaf"), STOP, DONE),
    # the key
    "key-in-a-usage-chunk-first": sse(
        USAGE[:-1] + b',"k":"%b"}' % UPSTREAM_KEY.encode(), chunk("a"), STOP, DONE
    ),
    "key-in-an-error": sse(
        chunk("a"), b'{"error":{"message":"bad key %b"}}' % UPSTREAM_KEY.encode()
    ),
}


def assert_sdk_safe(got: tuple[int, bytes]) -> None:
    """Every event the client gets is one `data:` line holding one JSON object (or [DONE])."""
    status, body = got
    if status != 200:
        return
    assert body.endswith(b"\n\n")
    for event in body[:-2].split(b"\n\n"):
        assert event.startswith(b"data: ") and b"\n" not in event, event
        data = event[6:]
        if data != b"[DONE]":
            assert isinstance(msgspec.json.decode(data), dict), data
    assert UPSTREAM_KEY.encode() not in body
    body.decode()  # valid UTF-8


@pytest.mark.parametrize("wants_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("case", list(CASES))
async def test_an_odd_chunk_reaches_the_client_as_it_would_event_by_event(
    build: Build, case: str, wants_usage: bool
) -> None:
    got, _ = await chat_both_ways(build, CASES[case], wants_usage)
    check_framing(got)
    assert_sdk_safe(got)


def last_event(got: tuple[int, bytes]) -> bytes:
    return got[1][:-2].rsplit(b"\n\n", 1)[-1]


@pytest.mark.parametrize(
    "case",
    ["finish-empty-string", "finish-true", "finish-object", "finish-nested-in-delta"],
)
async def test_a_finish_reason_that_is_not_a_reason_leaves_a_cut_stream_cut(
    build: Build, case: str
) -> None:
    got, row = await chat_both_ways(build, CASES[case])
    assert b"before the answer was complete" in last_event(got)
    assert b"data: [DONE]" not in got[1]
    assert row["status"] == 502


async def test_a_spaced_finish_reason_is_a_finish(build: Build) -> None:
    got, row = await chat_both_ways(build, CASES["finish-spaced"])
    assert last_event(got) == b"data: [DONE]" and row["status"] == 200


@pytest.mark.parametrize("wants_usage", [False, True], ids=["no-usage", "usage"])
async def test_an_error_event_holding_usage_ends_the_stream(
    build: Build, wants_usage: bool
) -> None:
    # Once stripped as a usage chunk (or relayed as one): the client never saw the error.
    got, row = await chat_both_ways(build, CASES["error-with-usage-inside"], wants_usage)
    assert b"overloaded" in last_event(got) and b'"error"' in last_event(got)
    assert row["status"] == 502


@pytest.mark.parametrize(
    "case",
    ["usage-then-null", "usage-nested-in-a-choice", "usage-spaced", "usage-with-a-nested-null"],
)
async def test_a_usage_that_is_null_or_nested_is_no_usage_chunk_and_a_spaced_one_is(
    build: Build, case: str
) -> None:
    got, row = await chat_both_ways(build, CASES[case])
    if case == "usage-then-null":  # relayed as the chunk it is; the row estimated
        assert b'"usage":null}' in got[1] and row["estimated"]
    elif case in ("usage-spaced", "usage-with-a-nested-null"):  # a usage chunk: counted, stripped
        assert b'"usage"' not in got[1] and (row["prompt_tokens"], row["estimated"]) == (3, 0)
    else:  # relayed; the real usage chunk after it counted and stripped
        assert b'"usage":{"prompt_tokens":3' in got[1] and USAGE not in got[1]
        assert (row["prompt_tokens"], row["estimated"]) == (3, 0)


# Reads that end where the check's two paths meet: a usage chunk read event by event, then a
# read whose chunks pass as the upstream's bytes.
SPLITS = {
    "nested-usage-after-the-usage": (sse(chunk("a"), USAGE), sse(NESTED, STOP, DONE)),
    "null-usage-after-the-usage": (
        sse(chunk("a"), USAGE),
        sse(chunk("b")[:-1] + b',"usage":null}', STOP, DONE),
    ),
    "usage-null-duplicate-after-the-usage": (
        sse(chunk("a"), USAGE),
        sse(STOP[:-1] + b',"usage":%b,"usage":null}' % USAGE_BODY, DONE),
    ),
    "empty-finish-then-cut": (sse(chunk("a")), sse(finishing(b'""'))),
    "nested-finish-then-cut": (sse(chunk("a")), sse(CASES["finish-top-level"][-200:])),
    "array-opened-in-one-read-closed-in-the-next": (
        sse(chunk("a"), b"[" + chunk("b")),
        sse(chunk("c") + b"]", STOP, DONE),
    ),
}


@pytest.mark.parametrize("case", list(SPLITS))
async def test_odd_chunks_split_across_reads_reach_the_client_as_event_by_event(
    build: Build, case: str
) -> None:
    got, row = await chat_both_ways(build, SPLITS[case])
    check_framing(got)
    assert_sdk_safe(got)
    if case.endswith("after-the-usage"):  # counted, not reset by a later usage that is none
        assert (row["prompt_tokens"], row["estimated"]) == (3, 0)


async def test_a_read_of_100000_events_passes_byte_for_byte(build: Build) -> None:
    events = sse(*[b'{"choices":[{"delta":{"content":"%d"}}]}' % i for i in range(100_000)], STOP)
    rig = await build("openai", sends(until_close(events + sse(USAGE, DONE))))
    status, got = await rig.post("/v1/chat/completions", CHAT_BODY)
    assert (status, got) == (200, events + sse(DONE))
    row = (await usage_rows(rig.gateway))[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (3, 2, 0)


async def test_the_sdk_reads_a_read_of_odd_but_valid_chunks(build: Build) -> None:
    body = sse(
        chunk("h\u00e9"),
        chunk(b"x\\u0000\\n\\ndata: y"),
        chunk("b")[:-1] + b',"usage":null,"error":null}',
        NESTED,
        STOP,
        USAGE,
        DONE,
    )
    rig = await build("openai", sends(until_close(body)))
    async with openai_client(rig.gateway, rig.key) as client:
        chunks = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        got: list[Any] = [c async for c in chunks]
    contents = [c.choices[0].delta.content for c in got if c.choices]
    assert contents == ["h\u00e9", "x\x00\n\ndata: y", "b", "a", None]
    assert [c.usage.total_tokens for c in got if c.usage] == [5]


@pytest.mark.parametrize(
    "case", ["finish-empty-string", "finish-top-level", "usage-spaced", "error-with-usage-inside"]
)
async def test_azure_reads_odd_chunks_as_event_by_event(build: Build, case: str) -> None:
    got, _ = await both_ways(build, "azure", CASES[case], "/v1/chat/completions", CHAT_BODY, False)
    check_framing(got)
    assert_sdk_safe(got)


@pytest.mark.parametrize("case", ["finish-empty-string", "usage-spaced", "error-with-usage-inside"])
async def test_a_completions_read_of_odd_chunks_is_as_event_by_event(
    build: Build, case: str
) -> None:
    body = {"model": "m", "prompt": "hi", "stream": True}
    upstream = CASES[case].replace(b"chat.completion.chunk", b"text_completion")
    got, _ = await both_ways(build, "openai", upstream, "/v1/completions", body, False)
    check_framing(got)
    assert_sdk_safe(got)
