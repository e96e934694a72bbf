"""OpenAI streams relayed as the upstream sent them: the one-decode check of a run of events."""

from __future__ import annotations

import pytest

from gateway.providers._sse import Framed, SSEDecoder
from gateway.providers._stream_check import StreamCheck

CHUNK = b'{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'
DONE_CHUNK = b'{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'


def events(*payloads: bytes) -> bytes:
    return b"".join(b"data: %b\n\n" % p for p in payloads)


def test_a_run_of_plain_chunks_passes_counted() -> None:
    check = StreamCheck("up")
    run = events(CHUNK, CHUNK, CHUNK)
    assert check.see_run(run) == (3, len(run))
    assert not check.finished
    run = events(CHUNK, DONE_CHUNK)
    assert check.see_run(run) == (2, len(run))
    assert check.finished  # a finish_reason seen on the way through


USAGE_CHUNK = b'{"id":"c","choices":[],"usage":{"prompt_tokens":1}}'


def test_the_plain_chunks_before_a_usage_chunk_pass() -> None:
    """The usage chunk often comes in the read of the last chunks: those still pass, and the
    check says where they end so the usage chunk alone is looked at."""
    check = StreamCheck("up")
    head = events(CHUNK, DONE_CHUNK)
    assert check.see_run(head + events(USAGE_CHUNK)) == (2, len(head))
    assert check.finished
    error = events(b'{"error":{"message":"overloaded"}}')
    assert StreamCheck("up").see_run(events(CHUNK) + error + events(CHUNK)) == (
        1,
        len(events(CHUNK)),
    )
    # Whatever follows the plain head is left to the caller: [DONE], an event that is not one
    # JSON object (which `see` then refuses), a usage chunk.
    for tail in (events(b"[DONE]"), events(b"{},{}"), events(b'{"a":[1', b"2]},{}")):
        check = StreamCheck("up")
        assert check.see_run(events(CHUNK) + tail) == (1, len(events(CHUNK)))
        assert not check.finished


@pytest.mark.parametrize(
    "run",
    [
        events(USAGE_CHUNK, CHUNK),  # to account
        events(b'{"error":{"message":"overloaded"}}'),  # to end the stream with
        events(b"[DONE]", CHUNK),  # to stop at
        events(b"{},{}"),  # one event, two objects: not one JSON object for the client
        events(b'{"a":1'),  # not JSON
        events(b"[1]"),  # JSON, not an object
        b'data: {\n"a":1}\n\n',  # an SSE client reads the event "{" and skips the line
        b'data: {\r\r"a":1}\n\n',  # the same with CRs
        b"data: {}\n\n: ping\n\ndata: {}\n\n",  # a comment between
        b"data: {}\n\n\n\ndata: {}\n\n",  # a blank line too many
        b'data: {"a":\ndata: 1}\n\n',  # several data lines: one payload, joined by a newline
        events(b'{"a":"', b'"},{}'),  # a string from one event into the next, made up for
        events(b'{"a":[1', b"2]},{}"),  # an array from one event into the next, made up for
        events(b'{"a":[1', b"2]}, {}"),  # the same, a space making the lengths add up
    ],
    ids=[
        "usage", "error", "done", "two-objects", "not-json", "array", "lf-inside",
        "cr-inside", "comment", "blank-line", "multi-line", "string-across",
        "array-across", "array-across-spaced",
    ],
)  # fmt: skip
def test_a_run_with_anything_to_look_at_does_not_pass(run: bytes) -> None:
    check = StreamCheck("up")
    assert check.see_run(run) == (0, 0)
    assert not check.finished


def test_a_run_that_cannot_pass_is_split_as_the_decoder_splits_it() -> None:
    run = b'data: {"a":\ndata: 1}\n\ndata: {}\n\n'
    assert Framed((run,)).payloads() == SSEDecoder(1024).feed(run) == [b'{"a":\n1}', b"{}"]


def test_only_whole_data_events_with_nothing_held_may_pass() -> None:
    decoder = SSEDecoder(1024)
    assert decoder.passes(events(CHUNK))
    assert not decoder.passes(b": ping\n\n")
    assert not decoder.passes(b"data: {}\n")  # a partial event
    decoder.feed(b"data: {")
    assert not decoder.passes(events(CHUNK))  # it would complete the held event


def test_a_read_of_one_event_is_checked_as_the_same_run_would_be() -> None:
    """A read of one event (most reads of a streaming answer) is decoded as one object, and
    judged exactly as in a longer run."""
    check = StreamCheck("up")
    assert check.see_run(events(CHUNK)) == (1, len(events(CHUNK)))
    assert not check.finished
    assert check.see_run(events(DONE_CHUNK)) == (1, len(events(DONE_CHUNK)))
    assert check.finished
    for payload in (USAGE_CHUNK, b'{"error":{"message":"x"}}', b"{},{}", b"[1]", b"", b"{"):
        assert StreamCheck("up").see_run(events(payload)) == (0, 0), payload
