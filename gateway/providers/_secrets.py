"""The upstream key an upstream quotes back, found and replaced in what reaches the client.

An upstream (or a proxy before it) that echoes the key it was sent would hand the gateway's
credential to every client. What it relays is mostly JSON, and JSON may spell any character
as `\\uXXXX` (either case of hex digit) and `/` as `\\/` (PHP's `json_encode` does), so the key
is searched for as it is and, where the text has such escapes at all, with any of its
characters escaped (the client's JSON parser would read either back as the key).

The common case costs a `find` for the key and one for `\\u` per answer or event: the
escape-aware search (a regular expression) only runs on text that has an escape the key could
be written with. Keys shorter than `MIN_SECRET_CHARS` are placeholders for keyless servers
("EMPTY", "ollama"), not secrets: replacing such a word wherever an answer says it would
corrupt the answer.

A key split across reads of a stream is whole again by the time an event is searched: a read
is only relayed without being split into events when it is whole events (`_sse.passes`).
"""

from __future__ import annotations

import re

__all__ = ["MIN_SECRET_CHARS", "REDACTED", "Secret", "redact", "redact_each"]

MIN_SECRET_CHARS = 16
REDACTED = b"[redacted]"

# JSON's two-character escapes of characters a key could hold (header values are printable).
_SHORT = {'"': b'\\\\"', "\\": b"\\\\\\\\", "/": b"\\\\/"}


def _hex(code: int) -> bytes:
    return b"".join(
        b"[%b%b]" % (d.encode(), d.upper().encode()) if d.isalpha() else d.encode()
        for d in f"{code:04x}"
    )


def _char(c: str) -> bytes:
    alternatives = [re.escape(c.encode()), b"\\\\u" + _hex(ord(c))]
    if c in _SHORT:
        alternatives.append(_SHORT[c])
    return b"(?:%b)" % b"|".join(alternatives)


class Secret:
    """One upstream key, as it is and as a pattern for it with any character JSON-escaped."""

    __slots__ = ("escapes", "pattern", "raw")

    def __init__(self, key: str) -> None:
        self.raw = key.encode()
        self.pattern = re.compile(b"".join(_char(c) for c in key))
        # What text must hold for the key to be in it escaped (else the pattern never runs).
        self.escapes = (b"\\u", *(b"\\" + c.encode() for c in key if c in _SHORT))

    def absent(self, data: bytes) -> bool:
        """Whether `data` can be relayed as it is: neither the key nor an escape it could be
        spelled with is in it (one `find` more than the key's own in the common case)."""
        if data.find(self.raw) >= 0:
            return False
        for escape in self.escapes:  # noqa: SIM110 (a loop, not a generator: once a read)
            if data.find(escape) >= 0:
                return False
        return True

    @classmethod
    def of(cls, key: str | None) -> Secret | None:
        return cls(key) if key is not None and len(key) >= MIN_SECRET_CHARS else None


def redact(data: bytes, secret: Secret | None) -> bytes:
    """`data` with the key, in any spelling JSON reads back as the key, as `[redacted]`."""
    # (`find` for `in`: see `_sse`)
    if secret is None:
        return data
    if data.find(secret.raw) >= 0:
        data = data.replace(secret.raw, REDACTED)
    for escape in secret.escapes:
        if data.find(escape) >= 0:
            return secret.pattern.sub(REDACTED, data)
    return data


def redact_each(batch: list[bytes], secret: Secret) -> None:
    """`redact` each payload of `batch`, in place."""
    for i, payload in enumerate(batch):
        redacted = redact(payload, secret)
        if redacted is not payload:
            batch[i] = redacted
