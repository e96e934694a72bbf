"""Circuit breakers for upstream accounts: take a failing account out of rotation for a while.

An account (one API key of one provider) that fails `threshold` times within `window` seconds,
or answers 429 with a `retry-after`, is *open* (cooling down) until its cooling period ends.
Then it is *half-open*: one request may probe it; success closes the breaker, failure opens it
again. An account whose credentials the upstream refused is *disabled* until the config
changes (a restart), since retrying cannot fix a wrong key. All state is memory only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

__all__ = ["Account", "BreakerBoard"]

log = structlog.get_logger(__name__)

Account = tuple[str, int]  # (provider name, index of the API key in its config)
Clock = Callable[[], float]


@dataclass(slots=True)
class _Breaker:
    failures: deque[float] = field(default_factory=deque)
    open_until: float = 0.0
    probing: bool = False  # half-open, and a probe request is on its way
    disabled: bool = False


class BreakerBoard:
    """The breaker of every upstream account."""

    def __init__(
        self,
        *,
        threshold: int,
        window: float,
        cooldown: float,
        max_pause: float = 300.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.window = window
        self.cooldown = cooldown
        self.max_pause = max_pause  # the longest an upstream's retry-after benches an account
        self.clock = clock
        self._breakers: dict[Account, _Breaker] = {}

    def _get(self, account: Account) -> _Breaker:
        breaker = self._breakers.get(account)
        if breaker is None:
            breaker = self._breakers[account] = _Breaker()
        return breaker

    def usable(self, account: Account) -> bool:
        """Whether the account may be tried now (closed, or half-open with no probe out)."""
        breaker = self._breakers.get(account)
        if breaker is None:
            return True
        if breaker.disabled:
            return False
        if breaker.open_until == 0.0:
            return True
        return self.clock() >= breaker.open_until and not breaker.probing

    def attempt(self, account: Account) -> bool | None:
        """Claim an attempt: None if the account must not be tried now, else whether this
        attempt is the half-open probe (only the probe's outcome may end the probe)."""
        if not self.usable(account):
            return None
        breaker = self._breakers.get(account)
        if breaker is not None and breaker.open_until:
            breaker.probing = True
            return True
        return False

    def release(self, account: Account, probe: bool) -> None:
        """An attempt ended without a verdict on the account (cancelled, or the request's own
        fault): a probe slot opens again."""
        breaker = self._breakers.get(account)
        if breaker is not None and probe:
            breaker.probing = False

    def succeeded(self, account: Account, probe: bool = False) -> None:
        breaker = self._breakers.get(account)
        if breaker is None or breaker.disabled or (breaker.probing and not probe):
            return  # a late answer of an older attempt says nothing about the probe's account
        if breaker.open_until:
            log.info("upstream_account_recovered", provider=account[0], account=account[1])
        breaker.failures.clear()
        breaker.open_until = 0.0
        breaker.probing = False

    def failed(
        self, account: Account, retry_after: float | None = None, probe: bool = False
    ) -> None:
        """Count a failure; open the breaker after too many, or for the upstream's retry-after."""
        now = self.clock()
        breaker = self._get(account)
        breaker.failures.append(now)
        while breaker.failures and breaker.failures[0] <= now - self.window:
            breaker.failures.popleft()
        pause = None
        if retry_after is not None and retry_after > 0:
            pause = min(retry_after, self.max_pause)
        elif probe or len(breaker.failures) >= self.threshold:
            pause = self.cooldown
        if probe:
            breaker.probing = False
        if pause is not None and (not breaker.probing or probe):
            breaker.open_until = max(breaker.open_until, now + pause)
            log.warning(
                "upstream_account_cooling_down",
                provider=account[0],
                account=account[1],
                seconds=round(pause, 3),
            )

    def disable(self, account: Account) -> None:
        """Take the account out until a restart: the upstream refused its credentials."""
        breaker = self._get(account)
        if not breaker.disabled:
            breaker.disabled = True
            log.error(
                "upstream_account_disabled",
                provider=account[0],
                account=account[1],
                reason="the upstream refused this API key; fix the config and restart",
            )

    def state(self, account: Account) -> str:
        """`closed`, `open`, `half-open` or `disabled` (for tests and operators)."""
        breaker = self._breakers.get(account)
        if breaker is None or (breaker.open_until == 0.0 and not breaker.disabled):
            return "closed"
        if breaker.disabled:
            return "disabled"
        return "open" if self.clock() < breaker.open_until else "half-open"
