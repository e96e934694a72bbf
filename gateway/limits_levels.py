"""The bucket levels a replica last heard from Redis, for the x-ratelimit response headers.

Each script answers with the level of the bucket it touched; reading Redis again for the
headers would cost a round trip per answer. Between answers a level refills as the bucket
does (capacity per minute), so the headers read as the in-memory gate's would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gateway.ratelimit import duration
from gateway.records import KeyRecord

__all__ = ["Levels"]


@dataclass(slots=True)
class _Seen:
    """A key's bucket levels as the last script returned them (for its response headers)."""

    rpm: float | None = None
    tpm: float | None = None
    at: float = 0.0


class Levels:
    """Each key's last known request and token levels."""

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}

    def clear(self) -> None:
        self._seen.clear()

    def saw(self, key: KeyRecord, *, rpm: float | None = None, tpm: float | None = None) -> None:
        seen = self._seen.get(key.id)
        if seen is None:
            seen = self._seen[key.id] = _Seen()
        now = time.monotonic()
        # Carry the other bucket's level forward to now, so both read from one instant.
        elapsed = now - seen.at
        # A script answers -1 for a bucket the key does not have; a bucket it has may be in
        # debt (a request holding more than its likely size), below -1 too.
        if rpm is not None and key.rpm is not None:
            seen.rpm = rpm
        elif seen.rpm is not None and key.rpm is not None:
            seen.rpm = _refilled(seen.rpm, key.rpm, elapsed)
        if tpm is not None and key.tpm is not None:
            seen.tpm = tpm
        elif seen.tpm is not None and key.tpm is not None:
            seen.tpm = _refilled(seen.tpm, key.tpm, elapsed)
        seen.at = now

    def give_back(self, key: KeyRecord, tokens: int) -> None:
        """A request used `tokens` fewer than it held: they are back in the token bucket (its
        end reaches Redis later; this answer's headers show them already)."""
        seen = self._seen.get(key.id)
        if key.tpm is not None and seen is not None and seen.tpm is not None:
            level = _refilled(seen.tpm, key.tpm, time.monotonic() - seen.at)
            self.saw(key, tpm=min(float(key.tpm), level + tokens))

    def headers(self, key: KeyRecord) -> dict[str, str] | None:
        """The key's x-ratelimit headers, or None when no script has answered for it yet."""
        seen = self._seen.get(key.id)
        if seen is None:
            return None
        elapsed = time.monotonic() - seen.at
        headers: dict[str, str] = {}
        for name, cap, level in (("requests", key.rpm, seen.rpm), ("tokens", key.tpm, seen.tpm)):
            if cap is None:
                continue
            now = cap if level is None else _refilled(level, cap, elapsed)
            headers[f"x-ratelimit-limit-{name}"] = str(cap)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(now)))
            headers[f"x-ratelimit-reset-{name}"] = duration(max(0.0, (cap - now) * 60 / cap))
        return headers


def _refilled(level: float, cap: int, elapsed: float) -> float:
    return min(float(cap), level + elapsed * cap / 60)
