"""Circuit breakers for upstream accounts: take a failing account out of rotation for a while,
without ever taking down what they protect.

An account (one API key of one provider) is out of rotation for one of three reasons:

- *failures*: `threshold` failed requests within `window` seconds (all retries of one request
  count once) take it out for `cooldown` seconds;
- *the upstream asked*: a 429 (or 5xx) with `retry-after` takes it out for that long (capped);
- *refused credentials* (401/403) disable it for `auth_cooldown` seconds.

When its time is up it is *half-open*: one request probes it, and the probe's outcome closes
or reopens it (a streamed probe closes it at its first byte, and reopens it if its upstream
then breaks the stream: `broke()`). A stream's outcome is its end, not its first byte
(`failover.stream_ended`). Being out for failures is only a preference: when every route of
a model is out, the route closest to recovery is still tried (Envoy's panic mode), since the
failures may be over, so a model's only account is never refused for them. What the
upstream asked for, and refused credentials, are honoured: with nothing else left, the client
gets the upstream's status with the real remaining wait, or a non-retryable error saying what
the operator must fix (`refusal()`). All state is memory only; a config reload keeps the
breakers of accounts it did not change (`adopt()`).
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from gateway.errors import (
    UpstreamAuthError,
    UpstreamError,
    UpstreamOutOfCredit,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from gateway.settings import RoutingSettings

__all__ = ["Account", "BreakerBoard", "Claim", "credentials_refused", "out_of_credit"]

log = structlog.get_logger(__name__)

Account = tuple[str, int]  # (provider name, index of the API key in its config)
Clock = Callable[[], float]


class Claim(enum.Enum):
    """What an attempt on an account is, which decides what its outcome may change."""

    ORDINARY = 0  # the breaker is closed
    PROBE = 1  # the one probe of a half-open breaker
    PANIC = 2  # an account out of rotation, tried because no route is left


class _Cause(enum.Enum):
    FAILURES = "failures"
    RATE_LIMITED = "rate_limited"  # an upstream 429 with retry-after
    UNAVAILABLE = "unavailable"  # an upstream 5xx with retry-after
    CREDENTIALS = "credentials"
    OUT_OF_CREDIT = "out_of_credit"  # (the account's credit spent: disabled as credentials)


_DISABLED = frozenset({_Cause.CREDENTIALS, _Cause.OUT_OF_CREDIT})


@dataclass(slots=True)
class _Breaker:
    failures: deque[float] = field(default_factory=deque)
    open_until: float = 0.0  # 0: closed
    cause: _Cause = _Cause.FAILURES
    probing: bool = False  # half-open, and the probe is on its way


class BreakerBoard:
    """The breaker of every account of a config.

    Args:
        routing: thresholds and cooldowns.
        accounts: every account, with what identifies it across config reloads (its
            provider's type and address and its key): `adopt()` matches on it.
    """

    def __init__(
        self,
        routing: RoutingSettings,
        accounts: Mapping[Account, object] | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.threshold = routing.failure_threshold
        self.window = routing.failure_window
        self.cooldown = routing.cooldown
        self.max_pause = routing.max_cooldown  # the longest an upstream's retry-after benches
        self.auth_cooldown = routing.auth_cooldown
        self.clock = clock
        self._identity = dict(accounts or {})
        self._breakers: dict[Account, _Breaker] = {a: _Breaker() for a in self._identity}

    def adopt(self, previous: BreakerBoard) -> None:
        """Take over the breakers (and clock) of `previous` for every account whose identity
        is unchanged, so a config reload does not forget what it has not changed. A breaker
        object is then shared: late outcomes of requests on the old config still count."""
        by_identity = {
            identity: previous._breakers[account]
            for account, identity in previous._identity.items()
            if account in previous._breakers
        }
        for account, identity in self._identity.items():
            kept = by_identity.get(identity)
            if kept is not None:
                self._breakers[account] = kept
        self.clock = previous.clock

    def _get(self, account: Account) -> _Breaker:
        breaker = self._breakers.get(account)
        if breaker is None:
            breaker = self._breakers[account] = _Breaker()
        return breaker

    def usable(self, account: Account) -> bool:
        """Whether the account is in rotation now (closed, or half-open with no probe out)."""
        breaker = self._breakers.get(account)
        if breaker is None or breaker.open_until == 0.0:
            return True
        return self.clock() >= breaker.open_until and not breaker.probing

    def may_panic(self, account: Account) -> bool:
        """Whether the account may be tried when no route is in rotation: anything but an
        account the upstream benched (retry-after) or refused, while that time lasts."""
        breaker = self._breakers.get(account)
        if breaker is None or breaker.cause is _Cause.FAILURES:
            return True
        return self.clock() >= breaker.open_until

    def recovery(self, account: Account) -> float:
        """When the account is due back in rotation (0: it is)."""
        breaker = self._breakers.get(account)
        return 0.0 if breaker is None else breaker.open_until

    def attempt(self, account: Account) -> Claim | None:
        """Claim an attempt in rotation: None if the account is out of it now."""
        breaker = self._breakers.get(account)
        if breaker is None or not breaker.open_until:  # closed: most attempts, at once
            return Claim.ORDINARY
        if not self.usable(account):
            return None
        breaker.probing = True
        return Claim.PROBE

    def panic(self, accounts: Iterable[Account]) -> Account | None:
        """With no account in rotation: the one closest to recovery that may still be tried."""
        found = [a for a in accounts if self.may_panic(a)]
        return min(found, key=self.recovery) if found else None

    def release(self, account: Account, claim: Claim) -> None:
        """An attempt ended without a verdict on the account (cancelled, or the request's own
        fault): a probe slot opens again."""
        breaker = self._breakers.get(account)
        if breaker is not None and claim is Claim.PROBE:
            breaker.probing = False

    def succeeded(self, account: Account, claim: Claim = Claim.ORDINARY) -> None:
        breaker = self._breakers.get(account)
        if breaker is None:
            return
        if claim is Claim.ORDINARY and breaker.open_until:
            return  # a late answer of an older attempt says nothing about the account now
        if breaker.open_until:
            log.info("upstream_account_recovered", provider=account[0], account=account[1])
        breaker.failures.clear()
        breaker.open_until = 0.0
        breaker.cause = _Cause.FAILURES
        breaker.probing = False

    def failed(
        self,
        account: Account,
        retry_after: float | None = None,
        claim: Claim = Claim.ORDINARY,
        *,
        counted: bool = True,
        rate_limited: bool = True,
        at_once: bool = False,
    ) -> None:
        """Record a failure: out of rotation after too many, or for the upstream's retry-after.

        Args:
            counted: False for a further failure of an account within the same request: a
                request's retries are one failure.
            rate_limited: the failure was a 429 (else a 5xx), for what a refusal reports.
            at_once: out for `cooldown` at this one failure, as after too many (an account
                that may be out of credit: OpenRouter's "can only afford 0").
        """
        now = self.clock()
        breaker = self._get(account)
        if counted:
            breaker.failures.append(now)
        while breaker.failures and breaker.failures[0] <= now - self.window:
            breaker.failures.popleft()
        decisive = claim is not Claim.ORDINARY
        if claim is Claim.PROBE:
            breaker.probing = False
        if breaker.probing:
            return  # a probe is out: only its outcome decides
        if retry_after is not None and retry_after > 0:
            pause = min(retry_after, self.max_pause)
            cause = _Cause.RATE_LIMITED if rate_limited else _Cause.UNAVAILABLE
        elif decisive or at_once or len(breaker.failures) >= self.threshold:
            pause, cause = self.cooldown, _Cause.FAILURES
        else:
            return
        if now + pause <= breaker.open_until and not decisive:
            return  # already out for longer
        breaker.open_until = now + pause
        breaker.cause = cause
        log.warning(
            "upstream_account_cooling_down",
            provider=account[0],
            account=account[1],
            seconds=round(pause, 3),
            reason=cause.value,
        )

    def broke(self, account: Account, claim: Claim, *, counted: bool = True) -> None:
        """Record a stream its upstream broke after the first byte, which put the account back
        already if the stream was a probe or a panic attempt (`succeeded`): their break is
        decisive, as their failure before that byte would have been. (As a panic claim: it
        holds no probe slot now, and must not free another request's.)"""
        decisive = Claim.ORDINARY if claim is Claim.ORDINARY else Claim.PANIC
        self.failed(account, None, decisive, counted=counted)

    def disable(self, account: Account, out_of_credit: bool = False) -> None:
        """Take the account out for `auth_cooldown`: the upstream refused its credentials, or
        (`out_of_credit`) said its credit is spent."""
        breaker = self._get(account)
        breaker.open_until = self.clock() + self.auth_cooldown
        breaker.cause = _Cause.OUT_OF_CREDIT if out_of_credit else _Cause.CREDENTIALS
        breaker.probing = False
        log.error(
            "upstream_account_disabled",
            provider=account[0],
            account=account[1],
            retry_in_seconds=self.auth_cooldown,
            reason="the upstream says this account's credit is spent; top it up"
            if out_of_credit
            else "the upstream refused this API key; fix it in the config and reload",
        )

    def accounts(self) -> list[Account]:
        """Every account with a breaker (for the metrics)."""
        return list(self._breakers)

    def remaining(self, account: Account) -> float:
        """Seconds until the account is due back in rotation (0: it is)."""
        breaker = self._breakers.get(account)
        return 0.0 if breaker is None else max(0.0, breaker.open_until - self.clock())

    def refusal(self, accounts: Iterable[Account], model_id: str | None) -> UpstreamError:
        """Why none of `accounts` may be tried now: the shortest wait an upstream asked for
        (its 429 or 503, with the real remaining `retry-after`), else refused credentials."""
        benched: list[tuple[float, Account, _Cause]] = []
        for account in accounts:
            breaker = self._breakers.get(account)
            if breaker is not None and breaker.open_until > self.clock():
                benched.append((self.remaining(account), account, breaker.cause))
        waits = [b for b in benched if b[2] not in _DISABLED]
        if waits:
            wait, account, cause = min(waits)
            if cause is _Cause.RATE_LIMITED:
                return UpstreamRateLimited(
                    f"The upstream provider '{account[0]}' is rate limiting requests for the "
                    f"model '{model_id}'; retry in {_seconds(wait)}.",
                    retry_after=wait,
                )
            return UpstreamUnavailable(
                f"The upstream provider '{account[0]}' asked for a pause for the model "
                f"'{model_id}'; retry in {_seconds(wait)}.",
                retry_after=wait,
            )
        if benched:
            wait, account, cause = min(benched)
            if cause is _Cause.OUT_OF_CREDIT:
                return out_of_credit(account, wait)
            return credentials_refused(account, wait)
        return UpstreamUnavailable(f"No upstream account for the model '{model_id}' is available.")

    def recent_failures(self, account: Account) -> tuple[int, float | None]:
        """Failures counted within the window, and seconds since the latest (None: none)."""
        breaker = self._breakers.get(account)
        if breaker is None or not breaker.failures:
            return 0, None
        now = self.clock()
        recent = sum(1 for t in breaker.failures if t > now - self.window)
        return recent, now - breaker.failures[-1]

    def state(self, account: Account) -> str:
        """`closed`, `open`, `half-open` or `disabled` (for tests and operators)."""
        breaker = self._breakers.get(account)
        if breaker is None or breaker.open_until == 0.0:
            return "closed"
        if self.clock() >= breaker.open_until:
            return "half-open"
        return "disabled" if breaker.cause in _DISABLED else "open"


def credentials_refused(account: Account, retry_in: float) -> UpstreamAuthError:
    """The non-retryable error of an account whose credentials the upstream refused, saying
    what the operator must fix (never which key, only where it is in the config)."""
    provider, index = account
    return UpstreamAuthError(
        f"The upstream provider '{provider}' refused the gateway's credentials (API key "
        f"#{index + 1} of that provider). This is a gateway configuration problem, not a "
        f"problem with your request: the operator must fix providers '{provider}' "
        f"api_keys[{index}] in the config and reload it. The gateway tries that key again "
        f"in {_seconds(retry_in)}."
    )


def out_of_credit(account: Account, retry_in: float, said: str = "") -> UpstreamOutOfCredit:
    """The non-retryable error of an account whose upstream said its credit is spent (`said`:
    the gateway's own words for the answer; never the upstream's text, which names the
    operator's account)."""
    said = said or f"The upstream provider '{account[0]}' account is out of credit."
    return UpstreamOutOfCredit(
        f"{said} This is a gateway account problem, not a problem with your request: the "
        f"operator must top it up. The gateway tries it again in {_seconds(retry_in)}."
    )


def _seconds(wait: float) -> str:
    whole = max(1, math.ceil(wait))
    return f"{whole} second" if whole == 1 else f"{whole} seconds"
