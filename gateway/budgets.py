"""Per-key spending budgets (tokens and/or USD, per day, week, month or in total).

A request holds the most it can cost (its prompt's upper bound plus its output limit, priced
with the model's prices) while it runs, and the hold is settled with what it really cost when
it ends. It is admitted only when its likely cost fits beside what is spent and what the other
requests in flight hold. So the budget is overspent by no more than one request's cost: the
last one admitted holds less than its most only by what its likely cost was short, and every
other request in flight holds at least what it can use. Spent amounts come from the usage
table, so they survive a restart. Periods are calendar periods in UTC; weeks start on Monday.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.errors import QuotaExceeded
from gateway.records import BudgetPeriod, KeyRecord

__all__ = ["Amount", "BudgetBook", "Spend", "over_budget", "period_start"]

Clock = Callable[[], float]
Amount = tuple[int, float]  # tokens, USD


def period_start(period: BudgetPeriod | None, now: float) -> float:
    """The unix time the budget period holding `now` began (0 for `total` or no period)."""
    if period in (None, "total"):
        return 0.0
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        day -= timedelta(days=day.weekday())
    elif period == "month":
        day = day.replace(day=1)
    return day.timestamp()


class _Periods:
    """`period_start` for the current time, recomputed only when a day has passed (calendar
    arithmetic costs microseconds, and every budgeted request asks twice)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._valid_until = -1.0
        self._starts: dict[BudgetPeriod | None, float] = {}

    def start(self, period: BudgetPeriod | None) -> float:
        now = self._clock()
        if now >= self._valid_until or now < self._valid_until - _DAY:
            self._starts.clear()
            self._valid_until = period_start("day", now) + _DAY  # every period turns at midnight
        start = self._starts.get(period)
        if start is None:
            start = self._starts[period] = period_start(period, now)
        return start


_DAY = 86400.0


@dataclass(slots=True)
class Spend:
    """A key's spending in its current period: settled, and held by requests in flight."""

    start: float
    tokens: int = 0
    usd: float = 0.0
    held_tokens: int = 0
    held_usd: float = 0.0


def over_budget(key: KeyRecord, likely: Amount, left: int, left_usd: float) -> QuotaExceeded | None:
    """The refusal of a request whose `likely` amount does not fit in what is `left` of the
    key's budget (tokens, USD; each checked only when the key has that budget), or None."""
    tokens, usd = likely
    over = []
    if key.budget_tokens is not None and tokens > left:
        over.append(f"{max(0, left)} of {key.budget_tokens} tokens left")
    if key.budget_usd is not None and usd > left_usd:
        over.append(f"${max(0.0, left_usd):.4f} of ${key.budget_usd:g} left")
    if not over:
        return None
    period = key.budget_period or "total"
    when = "in total" if period == "total" else f"this {period}"
    return QuotaExceeded(
        f"API limit exceeded, upgrade your plan: this key's budget has "
        f"{' and '.join(over)} {when}, and this request may use up to {tokens} "
        f"tokens (${usd:.4f}), built-in tool calls included. Lower max_tokens (or, with "
        "built-in tools, set max_tool_calls) or wait for the next period."
    )


class BudgetBook:
    """What every budgeted key has spent this period. `load()` fills it from the usage table."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._period = _Periods(clock)
        self._spend: dict[str, Spend] = {}
        self._periods: dict[str, BudgetPeriod | None] = {}
        # Holds of requests in flight whose key lost its budget: a budget given again while
        # they run must count them (and their ends must not release the holds of others).
        self._orphans: dict[str, Spend] = {}

    def needs_load(self, key: KeyRecord) -> bool:
        """Whether the key's spending must be read from the usage table first."""
        return key.has_budget and (
            key.id not in self._spend or self._periods.get(key.id) != key.budget_period
        )

    def load(self, key: KeyRecord, start: float, tokens: int, usd: float) -> None:
        """Set a key's settled spending since `start` (requests in flight keep their holds)."""
        orphan = self._orphans.pop(key.id, None)
        held = self._spend.get(key.id) or orphan
        self._spend[key.id] = Spend(
            start=start,
            tokens=tokens,
            usd=usd,
            held_tokens=held.held_tokens if held else 0,
            held_usd=held.held_usd if held else 0.0,
        )
        self._periods[key.id] = key.budget_period

    def forget(self, key: KeyRecord) -> None:
        """The key has no budget now; what its requests in flight hold is kept aside."""
        spend = self._spend.pop(key.id, None)
        self._periods.pop(key.id, None)
        if spend is not None:
            # Kept even with nothing held: a request that entered under the budget and is
            # charged after this (its body was still arriving) holds here, not in a spending
            # that `reserve` would otherwise start again at zero.
            self._orphans[key.id] = spend

    def spent(self, key: KeyRecord) -> Spend | None:
        spend = self._spend.get(key.id)
        if spend is not None:
            # The period loaded, not `key`'s: a request charged with the record it entered
            # with must not roll a newer, longer period's spending back to zero.
            self._roll(self._periods.get(key.id), spend)
        return spend

    def _roll(self, period: BudgetPeriod | None, spend: Spend) -> None:
        start = self._period.start(period)
        if start > spend.start:  # a new period: what was spent before no longer counts
            spend.start, spend.tokens, spend.usd = start, 0, 0.0

    def reserve(self, key: KeyRecord, likely: Amount, most: Amount) -> None:
        """Hold `most` (tokens, USD) of the key's budget for one request, or refuse it: it is
        refused unless its `likely` amount fits beside what is spent and what the requests in
        flight hold (their `most`).

        Raises:
            QuotaExceeded: the request does not fit in what is left of the budget.
        """
        spend = self.spent(key)
        orphan = self._orphans.get(key.id) if spend is None else None
        if orphan is not None:  # the budget was removed after the request entered: no refusal,
            orphan.held_tokens += most[0]  # but a budget given again counts its hold
            orphan.held_usd += most[1]
            return
        if spend is None:  # not loaded yet (a key created a moment ago has spent nothing)
            self.load(key, period_start(key.budget_period, self._clock()), 0, 0.0)
            spend = self._spend[key.id]
        refusal = over_budget(
            key,
            likely,
            key.budget_tokens - spend.tokens - spend.held_tokens
            if key.budget_tokens is not None
            else 0,
            key.budget_usd - spend.usd - spend.held_usd if key.budget_usd is not None else 0.0,
        )
        if refusal is not None:
            raise refusal
        spend.held_tokens += most[0]
        spend.held_usd += most[1]

    def count(self, key_id: str, used: Amount) -> None:
        """Count what a request that held nothing of the key's budget used, if the key has a
        budget now: one admitted before the budget was given, whose row the usage table did
        not have yet when the book loaded the key's spending."""
        spend = self._spend.get(key_id)
        if spend is None:  # (nearly every such request: its key has no budget)
            return
        self._roll(self._periods.get(key_id), spend)
        spend.tokens += used[0]
        spend.usd += used[1]

    def settle(self, key: KeyRecord, held: Amount, used: Amount) -> None:
        """Release a request's hold and count what it really used, in the period the key's
        budget has now (`key` is the record the request was admitted with: the period may
        have changed since, and the new one's spending was read from the usage table)."""
        spend = self._spend.get(key.id)
        if spend is None:
            orphan = self._orphans.get(key.id)
            if orphan is not None:  # its key has no budget now: only the hold goes
                # (Kept when nothing is held: one per key whose budget went, until it comes
                # back; a request still reading its body may be charged here yet.)
                orphan.held_tokens = max(0, orphan.held_tokens - held[0])
                orphan.held_usd = max(0.0, orphan.held_usd - held[1])
            return
        spend.held_tokens = max(0, spend.held_tokens - held[0])
        spend.held_usd = max(0.0, spend.held_usd - held[1])
        self._roll(self._periods.get(key.id), spend)
        spend.tokens += used[0]
        spend.usd += used[1]
