"""Request schema edge cases: every pass-through (Raw) field takes any JSON value, null too."""

from __future__ import annotations

import msgspec
import pytest

from gateway.schemas.chat import AssistantMessage, ChatCompletionRequest
from gateway.schemas.codec import decode_body, may_spell

RAW_FIELDS = [
    name for name, hint in ChatCompletionRequest.__annotations__.items() if "Raw" in str(hint)
]


def test_there_are_raw_fields() -> None:
    assert {"thinking", "audio", "prediction", "web_search_options"} <= set(RAW_FIELDS)


@pytest.mark.parametrize("name", RAW_FIELDS)
@pytest.mark.parametrize("value", [b'{"a": [1, {"b": null}]}', b"null", b'"text"', b"[1]"])
def test_raw_fields_accept_any_json(name: str, value: bytes) -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"x"}],"%s":%s}' % (
        name.encode(),
        value,
    )
    req = decode_body(body, ChatCompletionRequest)
    raw = getattr(req, name)
    if value == b"null":  # null means "not sent" (#12)
        assert raw is msgspec.UNSET
        return
    assert isinstance(raw, msgspec.Raw)
    assert msgspec.json.decode(raw) == msgspec.json.decode(value)


def test_assistant_raw_fields_accept_objects() -> None:
    body = (
        b'{"model":"m","messages":[{"role":"assistant","content":null,'
        b'"function_call":{"name":"f","arguments":"{}"},"audio":{"id":"a1"}}]}'
    )
    msg = decode_body(body, ChatCompletionRequest).messages[0]
    assert isinstance(msg, AssistantMessage)
    assert msgspec.json.decode(msg.audio) == {"id": "a1"}  # type: ignore[arg-type]


def test_may_spell_reads_escapes_of_the_words_own_letters_only() -> None:
    """A body may spell a key as it is, or with any of its letters escaped (either hex case);
    an escape of another character (an SDK's `\\u001b`, `\\u00e9`) cannot, nor an escaped
    quote (`\\"` is a character in a string, not the end of a key)."""
    word = b'file_id"'
    assert may_spell(b'{"file_id": "f"}', word)
    for escaped in (b"\\u0066", b"\\u0069", b"\\u006c", b"\\u006C", b"\\u005f", b"\\u005F"):
        assert may_spell(b'{"' + escaped + b'": 1}', word), escaped
    for other in (b'{"a": "\\u001b[31m"}', b'{"a": "caf\\u00e9"}', b'{"t": "file_id\\""}'):
        assert not may_spell(other, word), other
    assert not may_spell(b'{"a": 1}', word)
