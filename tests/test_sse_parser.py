"""The upstream SSE decoder: events per read, every framing variant the spec allows, bounded
buffering, and work linear in what it reads however the upstream splits it."""

from __future__ import annotations

import pytest

from gateway.providers import _sse
from gateway.providers._sse import EventTooLarge, SSEDecoder
from tests.conftest import calls_in

LIMIT = 16 * 1024 * 1024


def batches(pieces: list[bytes], limit: int = LIMIT) -> list[list[bytes]]:
    decoder = SSEDecoder(limit)
    out = [batch for piece in pieces if (batch := decoder.feed(piece))]
    tail = decoder.end()
    return [*out, tail] if tail else out


def test_one_read_many_events_is_one_batch() -> None:
    assert batches([b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"]) == [[b"1", b"2", b"[DONE]"]]


def test_events_split_across_reads() -> None:
    pieces = [b"da", b'ta: {"a"', b":1}\n", b"\ndata: 2\n\n"]
    assert batches(pieces) == [[b'{"a":1}', b"2"]]


@pytest.mark.parametrize("sep", [b"\r\n", b"\r", b"\n"])
def test_line_endings(sep: bytes) -> None:
    stream = b"data: 1" + sep + sep + b"data: 2" + sep + sep
    one_byte_reads = [stream[i : i + 1] for i in range(len(stream))]
    expected = [b"1", b"2"]
    assert [e for b in batches(one_byte_reads) for e in b] == expected
    assert [e for b in batches([stream]) for e in b] == expected


def test_comments_fields_and_multiline_data() -> None:
    stream = b": ping\n\nevent: x\nid: 3\ndata: a\ndata:b\n\nretry: 5\n\n"
    assert batches([stream]) == [[b"a\nb"]]


def test_unterminated_last_event_is_flushed() -> None:
    assert batches([b"data: 1\n\ndata: tail"]) == [[b"1"], [b"tail"]]


def test_large_event_in_small_reads() -> None:
    payload = b"x" * 300_000
    stream = b"data: " + payload + b"\n\n"
    reads = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    assert batches(reads) == [[payload]]


def test_an_event_over_the_limit_is_refused_as_it_grows() -> None:
    decoder = SSEDecoder(1000)
    assert decoder.feed(b"data: ok\n\n") == [b"ok"]
    decoder.feed(b"data: " + b"x" * 900)
    with pytest.raises(EventTooLarge):
        decoder.feed(b"x" * 200)


def test_an_event_at_the_limit_passes() -> None:
    event = b"data: " + b"x" * 994  # 1000 bytes before its separator
    assert batches([event[:500], event[500:], b"\n\n"], limit=1000) == [[b"x" * 994]]


BIG = b"data: " + b"x" * 995  # 1001 bytes before its separator


@pytest.mark.parametrize(
    ("before", "read"),
    [
        (b"", BIG + b"\n\ndata: b\n\n"),
        (b"", b"data: a\n\n" + BIG + b"\n\ndata: b\n\n"),
        (BIG[:500], BIG[500:] + b"\n\ndata: b\n\n"),
    ],
    ids=["alone", "after-one", "held"],
)
def test_an_event_over_the_limit_in_one_read_is_refused(before: bytes, read: bytes) -> None:
    # Whole in one read (aiohttp's `readany()` may hand over megabytes at once), never held
    # whole: refused all the same, alone, after a small event, or ending one held before.
    decoder = SSEDecoder(1000)
    assert decoder.feed(before) == []
    with pytest.raises(EventTooLarge):
        decoder.feed(read)


def test_a_read_over_the_limit_of_small_events_passes() -> None:
    events = b"".join(b"data: %d\n\n" % i for i in range(500))  # 5,390 bytes
    assert batches([events], limit=1000) == [[b"%d" % i for i in range(500)]]
    event = b"data: " + b"x" * 994 + b"\n\n"
    assert batches([event * 3], limit=1000) == [[b"x" * 994] * 3]  # each at the limit


def test_a_run_over_the_limit_is_not_relayed_as_it_is() -> None:
    # `passes` lets a run be relayed without its events being split: only one no longer than
    # the limit, which no event over it can fit in. A longer one is read by `feed`.
    decoder = SSEDecoder(1000)
    assert decoder.passes(b"data: " + b"x" * 992 + b"\n\n")
    assert not decoder.passes(b"data: " + b"x" * 993 + b"\n\n")
    assert not decoder.passes(b"data: a\n\n" * 200)


def test_work_is_linear_in_the_bytes_read() -> None:
    # One 4 MB event in 1-byte-ish reads: a parser that re-scans (or re-copies) its buffer on
    # every read does ~n^2/2 work; this one must stay within a small multiple of n.
    size = 4 * 1024 * 1024
    decoder = SSEDecoder(LIMIT)
    piece = b"y" * 4096
    decoder.feed(b"data: ")
    reads = 0
    for _ in range(size // len(piece)):
        assert decoder.feed(piece) == []
        reads += 1
    # The buffer only ever grows by what arrived: its search resumes where it stopped.
    assert decoder._scan >= size - 1
    assert decoder.feed(b"\n\n") == [b"y" * size]
    assert reads == size // 4096


# What carries no data, as an upstream could flood it: blank lines (LF, CRLF, CR), pings,
# comments and fields with no `data:` line.
NO_DATA = [b"\n", b"\r\n", b"\r", b":\n\n", b": ping\n\n", b"event: x\n\n", b"id: 1\nretry: 5\n\n"]


@pytest.mark.parametrize("junk", NO_DATA, ids=repr)
def test_a_flood_without_data_costs_work_per_read_not_per_byte(junk: bytes) -> None:
    # Before: a Python loop turn per empty event (1 MB/s of newlines pinned a core); an
    # upstream must not be able to spend one byte to make the gateway spend a microsecond.
    piece = junk * (65536 // len(junk))
    reads = (4 * 1024 * 1024) // len(piece)
    decoder = SSEDecoder(LIMIT)
    with calls_in(_sse) as work:
        for _ in range(reads):
            assert decoder.feed(piece) == []
    assert decoder.end() == []
    assert sum(work.values()) <= 20 * reads, work.most_common(5)


def test_junk_between_events_costs_a_few_calls_per_junk_event() -> None:
    junk = b":\n\n" * 5000 + b"event: x\n\n" * 5000
    piece = junk + b"data: {}\n\n"
    decoder = SSEDecoder(LIMIT)
    with calls_in(_sse) as work:
        for _ in range(10):
            assert decoder.feed(piece) == [b"{}"]
    assert sum(work.values()) <= 10 * (3 * 10_000 + 50), work.most_common(5)


def test_empty_data_is_not_an_event() -> None:
    # The SSE standard dispatches no event for an empty data buffer; relayed, `data: ` would
    # be a JSON parse error in the client's SDK.
    assert batches([b"data:\n\ndata: \n\ndata: 1\n\ndata:"]) == [[b"1"]]


def test_invalid_utf8_is_read_as_replacement_characters() -> None:
    # The SSE standard decodes a stream as UTF-8 with U+FFFD for invalid bytes; relayed as
    # they are, they would make the client's SDK fail to decode the stream at all.
    stream = b'data: {"a":"\xff\xfe ok \xc3\xa9"}\n\ndata: {"b":"\xed\xa0\x80"}\n\n'
    assert batches([stream]) == [
        ['{"a":"\ufffd\ufffd ok é"}'.encode(), '{"b":"\ufffd\ufffd\ufffd"}'.encode()]
    ]
    # A character split across reads is not invalid.
    assert batches([b'data: "\xc3', b'\xa9"\n\n']) == [['"é"'.encode()]]
