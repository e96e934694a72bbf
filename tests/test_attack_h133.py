"""Attack h133: cd6108e (`handlers/messages.py:_name_files`: a request's named files are
found by one regular expression, `_FILE_ID`, over the body; its messages are read for where
a file is only when a candidate is another key's), attacked from outside.

Alice holds one ordinary key and wants the file bob's code wrote (`file_bob_payroll`).
FINDING tests fail on cd6108e; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from gateway.handlers.messages import _FILE_ID
from tests import test_attack_h105, test_attack_h126
from tests.test_attack_h105 import Build
from tests.test_attack_h128 import ask, not_found, post
from tests.test_attack_h129 import bob_ran_code
from tests.test_attack_h132 import counting

build = test_attack_h105.build  # (the fixture, by its name)

Json = dict[str, Any]
BOB = "file_bob_payroll"


def document(source: str) -> bytes:
    """A request whose one block is a document whose `source` is the raw JSON `source`."""
    block = '{"type":"document","source":' + source + "}"
    return (
        json.dumps(ask(messages=[{"role": "user", "content": "@"}]))
        .replace('"@"', "[" + block + "]")
        .encode()
    )


# FINDING (high: bob's file reaches alice's answer if Anthropic's parser keeps a duplicated
# key's first value, as many do, or refuses nothing): a file source spelling `file_id` twice,
# bob's id first and alice's own last. `_FILE_ID` finds bob's id (a candidate that is another
# key's), so the messages are read, but msgspec keeps the last duplicate (`mine`), so no place
# holds bob's id; bob's candidate is then neither refused nor named and the body goes
# upstream as sent, bob's id in a `file_id` member where Anthropic reads files. Expected: 404
# and nothing upstream (a body that names another key's file where a file is read, in any
# member, is refused). Cause: `_name_files` drops a candidate `others()` says is bob's when
# `_find_files` did not locate it; fix by refusing then (or refusing duplicate keys).
async def test_a_duplicated_file_id_key_naming_bobs_file_first_is_refused(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, _, alice = await bob_ran_code(build)
    relayed: list[bytes] = []  # (the upstream's raw bodies: its `json.loads` keeps the last)

    def loads(raw: bytes) -> Any:
        relayed.append(raw)
        return json.loads(raw)

    monkeypatch.setattr(test_attack_h126, "json", SimpleNamespace(loads=loads))
    source = '{"type":"file","file_id":"' + BOB + '","file_id":"file_alice_notes"}'
    status, answer = await post(gw, alice, document(source))
    leaked = [raw for raw in relayed if BOB.encode() in raw]
    assert not leaked, f"bob's file went upstream for alice ({status}): {leaked[0][-200:]!r}"
    not_found(status, answer)


# FINDING (high: any key stalls the event loop for every key, once any answer showed a file):
# the regex's string part `"(?:[^"\\]|\\.)*"` costs Python's `re` 130-330 ms a megabyte of
# one string value (a 30 MB `file_id` value: 9.8 s; an escape-only one: 1.8 s), against the
# "about 2 ms a megabyte" cd6108e documents. 3 MB in a document's `file_id` (any place works:
# the regex reads every member) costs ~400 ms of `_name_files`. Expected: within 10x the
# documented rate (60 ms for 3 MB). Cause: an alternation inside a repeat, one backtracking
# frame a character; the unrolled `"[^"\\]*(?:\\.[^"\\]*)*"` finds the same in ~80 ms at
# 30 MB.
@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")  # (the relay's)
async def test_a_long_file_id_value_costs_what_the_docs_say(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, _, alice = await bob_ran_code(build)
    spent = counting(monkeypatch)
    body = document('{"type":"file","file_id":"file_' + "a" * 3_000_000 + '"}')
    headers = {"Authorization": f"Bearer {alice}", "Content-Type": "application/json"}
    async with gw.post("/v1/messages", data=io.BytesIO(body), headers=headers) as resp:
        await resp.read()
    assert spent, "the scan did not run"
    assert sum(spent) < 0.060, f"{sum(spent) * 1e3:.0f} ms looking for files in 3 MB"


# --- held ------------------------------------------------------------------------------------

# Every spelling msgspec reads as a `file_id` member holding bob's id: key escapes (lower and
# upper hex, every character), value escapes (`\u0062`, `\/`-free, `\u005F`), JSON's four
# whitespace characters around the colon, a key right after a string ending in an escaped
# backslash, a decoy key ending in `\"file_id` before the real one, a decoy string value
# `"file_id"` before it, a long value, an escaped-quote value before it.
KEY = '"\\u0066\\u0069\\u006C\\u0065\\u005F\\u0069\\u0064"'
SPELLINGS = [
    '{"file_id":"' + BOB + '"}',
    "{" + KEY + ':"' + BOB + '"}',
    '{"fi\\u006cE_id":"x","file\\u005fid":"' + BOB + '"}',
    '{"file_id":"file_\\u0062ob\\u005Fpayroll"}',
    '{"file_id" \t\r\n: \t\r\n"' + BOB + '"}',
    '{"x":"a\\\\","file_id":"' + BOB + '"}',
    '{"a\\"file_id":"b\\\\","file_id":"' + BOB + '"}',
    '{"a":["file_id"],"file_id":"' + BOB + '"}',
    '{"a":"\\"file_id\\":\\"","file_id":"' + BOB + '"}',
    '{"t":"' + "\\\\" * 5000 + '","file_id":"' + BOB + '"}',
]


@pytest.mark.parametrize("spelled", SPELLINGS)
def test_the_regex_finds_every_spelling_msgspec_reads(spelled: str) -> None:
    assert msgspec.json.decode(spelled.encode())["file_id"] == BOB
    found = [msgspec.json.decode(value) for _, value in _FILE_ID.findall(spelled.encode())]
    assert BOB in found, (spelled[:80], found)


# Not a `file_id` to msgspec, not to the regex either (`F` is not `f`; a form feed or
# vertical tab is not JSON whitespace: msgspec refuses the body before any scan).
@pytest.mark.parametrize("spelled", ['{"\\u0046ile_id":"x"}', '{"File_id":"x"}'])
def test_what_is_not_a_file_id_key_is_not_one(spelled: str) -> None:
    assert "file_id" not in msgspec.json.decode(spelled.encode())
    assert not _FILE_ID.findall(spelled.encode())
    for odd in (b"\x0c", b"\x0b"):
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(b'{"file_id"' + odd + b':"x"}')


# End to end: the hardest spellings above, in a document's source, own key last duplicated
# the other way round (msgspec keeps bob's), are 404 and nothing goes upstream.
async def test_escaped_spaced_and_reversed_duplicate_spellings_are_refused(build: Build) -> None:
    gw, up, alice = await bob_ran_code(build)
    sent = len(up.bodies)
    for source in (
        '{"type":"file",' + KEY + ' \t\r\n: "file_\\u0062ob\\u005Fpayroll"}',
        '{"type":"file","file_id":"file_alice_notes","file_id":"' + BOB + '"}',
        '{"type":"file","title":"a\\\\","file_id":"' + BOB + '"}',
    ):
        not_found(*await post(gw, alice, document(source)))
    assert len(up.bodies) == sent
