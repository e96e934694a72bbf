"""Times people type: `30d`, `12h`, `90m` from now (or ago), or an ISO-8601 time.

The CLI's `--expires`/`--since` and the admin API's `expires_at`/`since`/`until` share these.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

__all__ = ["parse_expires", "parse_since"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_LATEST = 253_402_300_799.0  # 9999-12-31T23:59:59Z, the last time datetime can show
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _instant(text: str, now: float, sign: int) -> float:
    """`30d`/`12h`/`90m` from now (times `sign`), or an ISO-8601 time (UTC unless it says)."""
    match = _DURATION.match(text)
    if match:
        return now + sign * float(match[1]) * _UNIT_SECONDS[match[2]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30d, 12h) nor an ISO-8601 time"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def parse_expires(text: str, now: float | None = None) -> float:
    """The unix time a key given `--expires TEXT` expires at; it must lie in the future."""
    now = time.time() if now is None else now
    when = _instant(text, now, +1)
    if when <= now:
        raise ValueError(f"{text!r} is not in the future")
    if when > _LATEST:
        raise ValueError(f"{text!r} is too far in the future (the limit is 9999-12-31)")
    return when


def parse_since(text: str, now: float | None = None) -> float:
    """The unix time `--since TEXT` means: a duration ago, or an ISO-8601 time."""
    return _instant(text, time.time() if now is None else now, -1)
