"""Attack on 60558b0 (helper-113): Gemini's modality details kept as `msgspec.Raw` and read on
their own (`GeminiUsage.modality`), and `prices._media` reading less audio than cached audio as
the uncached audio alone.

Each failing test asserts what should happen; the comment above it says what is wrong,
expected vs actual, severity. Passing tests marked `# SOUND:` pin what was checked and held.
Upstreams are in-process raw TCP servers (tests/raw_upstream); helpers are helper-105's, -111's.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.prices import Price, Rates, Usage
from gateway.providers.gemini import wire
from tests import test_attack_h105
from tests.raw_upstream import STREAM_HEAD
from tests.test_attack_h105 import Build, gemini_answer, mtok
from tests.test_attack_h111 import (
    AUDIO,
    AUDIO_CHAT,
    BILLED,
    FLASH,
    gemini_chunk,
    gemini_cost,
    text_cost,
    usage_of,
)

build = test_attack_h105.build  # (the fixture, by its name)

STREAM = AUDIO_CHAT | {"stream": True, "stream_options": {"include_usage": True}}
FLOOR = text_cost(100_010, 100_000, 10)
CEILING = mtok(100_010, FLASH["audio"]) + mtok(10, FLASH["output"])


def _with_raw(usage: dict[str, Any], field: str, text: bytes) -> bytes:
    """A whole Gemini answer whose `field` is the JSON text `text`, byte for byte."""
    usage = usage | {field: "@RAW@"}
    reply = gemini_answer(usage, [{"text": "ok"}]).replace(b'"@RAW@"', text)
    head, body = reply.split(b"\r\n\r\n", 1)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d" % len(body)
    return head + b"\r\n\r\n" + body


# SOUND: the details as `null`, `{}`, a string, `[ ]` and `[]` with spaces, a number past
# float range, or a list with one, on each of the three fields: 200, the counts read (not
# estimated), the cost between the counts' text cost and their costliest reading.
@pytest.mark.parametrize(
    "field", ["promptTokensDetails", "candidatesTokensDetails", "cacheTokensDetails"]
)
@pytest.mark.parametrize(
    "text",
    [b"null", b"{}", b'"x"', b"[ ]", b"[\n\t ]", b"  [  ]  ", b"1e400", b"[1e400, {}]", b"[[]]"],
)
async def test_odd_raw_details(build: Build, field: str, text: bytes) -> None:
    status, answer, row = await gemini_cost(build, _with_raw(usage_of(AUDIO, AUDIO), field, text))
    assert status == 200, answer
    assert not row["estimated"], row
    assert FLOOR * 0.999 <= row["cost_usd"] <= CEILING * 1.001, (row["cost_usd"], FLOOR)


# SOUND: details nested past msgspec's depth bound (and just under it) are never a 500: a
# whole answer is refused as malformed (502) or answered; a stream's only chunk unread is
# refused before the stream starts (502/503, the upstream's fault).
@pytest.mark.parametrize("depth", [100, 900, 5_000, 200_000])
@pytest.mark.parametrize("stream", [False, True])
async def test_deep_details_are_no_500(build: Build, depth: int, stream: bool) -> None:
    nested = b"[" * depth + b"]" * depth
    if stream:
        chunk = gemini_chunk("ok", usage_of(AUDIO, "@RAW@"), "STOP")
        reply = STREAM_HEAD + chunk.replace(b'"@RAW@"', nested)
        status, got, row = await gemini_cost(build, reply, STREAM)
        assert status in (200, 502, 503), got[-300:]  # (a first chunk unread: refused)
        assert b"Internal" not in got, got[-300:]
    else:
        reply = _with_raw(usage_of(AUDIO, AUDIO), "cacheTokensDetails", nested)
        status, got, row = await gemini_cost(build, reply)
        assert status in (200, 502), got
    if status == 200 and not stream:
        assert row["cost_usd"] >= FLOOR * 0.999, row


class _Spy:
    """`wire._DETAILS` counting its decodes."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = msgspec.json.Decoder()

    def decode(self, raw: Any) -> Any:
        self.calls += 1
        return self.real.decode(raw)


# SOUND: a stream of 60 chunks each carrying the usage so far with three 2,000-entry detail
# lists decodes the details only when pricing its end (a handful of decodes, not one per
# chunk), and is priced at the last chunk's cached audio.
async def test_stream_details_not_decoded_per_chunk(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy()
    monkeypatch.setattr(wire, "_DETAILS", spy)
    padding = [{"modality": "TEXT", "tokenCount": 0}] * 2_000
    chunks = []
    for i in range(60):
        usage = usage_of([*AUDIO, *padding], [*AUDIO, *padding])
        usage |= {"candidatesTokenCount": i + 1, "totalTokenCount": 100_011 + i}
        usage["candidatesTokensDetails"] = padding
        chunks.append(gemini_chunk("o", usage, "STOP" if i == 59 else None))
    status, got, row = await gemini_cost(build, STREAM_HEAD + b"".join(chunks), STREAM)
    assert status == 200
    assert b'"cached_audio_tokens":100000' in got, got[-400:]
    assert not row["estimated"], row
    assert 1 <= spy.calls <= 8, spy.calls
    assert row["cost_usd"] == pytest.approx(
        mtok(100_000, FLASH["cached_audio"]) + mtok(10, FLASH["input"]) + mtok(60, FLASH["output"])
    )


# SOUND: a stream whose details change per chunk (more cached audio, then the prompt's
# audio split otherwise) is priced at the last chunk's details, as its counts are.
async def test_stream_details_change_per_chunk(build: Build) -> None:
    first = usage_of([{"modality": "AUDIO", "tokenCount": 10}], None, cached=0)
    first |= {"candidatesTokenCount": 1, "totalTokenCount": 100_011}
    final = usage_of(AUDIO, AUDIO)
    reply = STREAM_HEAD + gemini_chunk("o", first) + gemini_chunk("k", final, "STOP")
    status, _, row = await gemini_cost(build, reply, STREAM)
    assert status == 200
    assert not row["estimated"], row
    assert row["cost_usd"] == pytest.approx(BILLED)


# WRONG (low, USD budgets): a Gemini stream whose earlier `usageMetadata` reports the prompt's
# audio (`promptTokensDetails` AUDIO 100,000) and whose last one, with counts not below the
# earlier, omits the details, is priced as if the prompt held no audio: `_count` replaces
# the counts so far with the last ones whole (details included), where each count is "the
# largest seen". Expected: the prompt's 100,000 audio tokens at the audio rate ($0.100 +
# text), as the earlier chunk said. Actual: text rate ($0.030 + output), ~3.3x under for the
# prompt. Realism: low (Gemini repeats `promptTokensDetails` in each chunk; a proxy that keeps
# only the counts in its last chunk would do this).
async def test_stream_details_dropped_by_the_last_chunk(build: Build) -> None:
    first = usage_of(AUDIO, None, cached=0) | {"candidatesTokenCount": 1}
    final = usage_of(None, None, cached=0)
    reply = STREAM_HEAD + gemini_chunk("o", first) + gemini_chunk("k", final, "STOP")
    status, _, row = await gemini_cost(build, reply, STREAM)
    assert status == 200
    audio = mtok(100_000, FLASH["audio"]) + mtok(10, FLASH["input"]) + mtok(10, FLASH["output"])
    assert row["cost_usd"] >= audio * 0.999, (row["cost_usd"], audio)


# SOUND: exact rows for a normal Gemini answer with details: all audio cached (Google's bill,
# `BILLED`), none cached, and audio out (`candidatesTokensDetails`) at the audio output rate
# (flash has none apart: the output rate).
@pytest.mark.parametrize(
    ("usage", "billed"),
    [
        (usage_of(AUDIO, AUDIO), BILLED),
        (
            usage_of(AUDIO, None, cached=0),
            mtok(100_000, FLASH["audio"]) + mtok(10, FLASH["input"]) + mtok(10, FLASH["output"]),
        ),
        (
            usage_of(AUDIO, [{"modality": "AUDIO", "tokenCount": 40_000}], cached=40_000),
            mtok(60_000, FLASH["audio"])
            + mtok(40_000, FLASH["cached_audio"])
            + mtok(10, FLASH["input"])
            + mtok(10, FLASH["output"]),
        ),
    ],
)
async def test_exact_rows(build: Build, usage: dict[str, Any], billed: float) -> None:
    status, answer, row = await gemini_cost(build, gemini_answer(usage, [{"text": "ok"}]))
    assert status == 200, answer
    assert not row["estimated"], row
    assert row["cost_usd"] == pytest.approx(billed), (row["cost_usd"], billed)
    details = answer["usage"]["prompt_tokens_details"]
    assert details.get("audio_tokens") == 100_000, details


# SOUND: the openai SDK parses the usage of details with odd spacing and a stream's usage chunk.
async def test_openai_sdk_parses_the_usage(build: Build) -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    text = json.dumps(AUDIO, indent=3).encode()
    reply = _with_raw(usage_of(None, AUDIO), "promptTokensDetails", text)
    status, answer, _ = await gemini_cost(build, reply)
    assert status == 200, answer
    parsed = ChatCompletion.model_validate(answer)
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.audio_tokens == 100_000
    assert (parsed.usage.prompt_tokens_details.model_extra or {}).get(
        "cached_audio_tokens"
    ) == 100_000
    reply = STREAM_HEAD + gemini_chunk("ok", usage_of(AUDIO, AUDIO), "STOP")
    status, got, _ = await gemini_cost(build, reply, STREAM)
    lines = [x[6:] for x in got.split(b"\n") if x.startswith(b"data: {")]
    last = ChatCompletionChunk.model_validate_json(lines[-1])
    assert last.usage is not None and last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.audio_tokens == 100_000


RATES = Rates(
    input=0.30,
    cached_input=0.03,
    output=2.50,
    cache_write=0.0,
    reasoning=2.50,
    audio_input=1.00,
    cached_audio_input=0.10,
)


# SOUND (unit): `_media` with less audio than cached audio (an older gateway's uncached audio
# alone) never costs below the text cost, nor above every prompt token as uncached audio.
@pytest.mark.parametrize(
    ("audio", "cached_audio"), [(0, 5), (1, 100_000), (99_999, 100_000), (10**12, 10**12 + 1)]
)
def test_less_audio_than_cached_audio(audio: int, cached_audio: int) -> None:
    usage = Usage(
        prompt=200_000,
        cached=100_000,
        completion=10,
        audio_input=audio,
        cached_audio=cached_audio,
    )
    cost = Price(RATES).cost(usage)
    text = (mtok(100_000, 0.30) + mtok(100_000, 0.03)) + mtok(10, 2.50)
    top = mtok(200_000, 1.00) + mtok(10, 2.50)
    assert text * 0.999 <= cost <= top * 1.001, (cost, text)
