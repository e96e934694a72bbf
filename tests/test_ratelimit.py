"""Rate limits and budgets as pure state machines, driven by a controllable clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.budgets import BudgetBook, period_start
from gateway.errors import QuotaExceeded, RateLimited
from gateway.ratelimit import Limiter, duration
from gateway.records import KeyRecord


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(**limits: object) -> KeyRecord:
    return KeyRecord(
        id="key_1", name="k", prefix="sk", digest="d", created_at=0, updated_at=0, **limits
    )  # type: ignore[arg-type]


def admit(limiter: Limiter, k: KeyRecord, tokens: int) -> None:
    """What the gate does for one request: enter, then take its tokens (or give it back)."""
    limiter.enter(k)
    try:
        limiter.take(k, tokens, tokens)
    except RateLimited:
        limiter.refund(k)
        limiter.leave(k)
        raise


def release(limiter: Limiter, k: KeyRecord, held: int, used: int) -> None:
    limiter.give_back(k, held, used)
    limiter.leave(k)


def test_rpm_window_refills_continuously() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    k = key(rpm=3)
    for _ in range(3):
        admit(limiter, k, 0)
    with pytest.raises(RateLimited) as err:
        admit(limiter, k, 0)
    assert err.value.retry_after == pytest.approx(20.0)  # one request comes back every 20 s
    assert "requests per minute (limit 3)" in err.value.message
    clock.now += 19.9
    with pytest.raises(RateLimited):
        admit(limiter, k, 0)
    clock.now += 0.1
    admit(limiter, k, 0)
    headers = limiter.headers(k)
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 60
    assert limiter.headers(k)["x-ratelimit-remaining-requests"] == "3"


def test_tokens_are_reserved_then_settled() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    k = key(tpm=1000)
    admit(limiter, k, 600)
    with pytest.raises(RateLimited) as err:
        admit(limiter, k, 600)
    assert "tokens per minute (limit 1000)" in err.value.message
    assert err.value.retry_after == pytest.approx(200 / (1000 / 60))
    release(limiter, k, 600, 100)  # 500 come back at once
    admit(limiter, k, 600)
    assert limiter.headers(k)["x-ratelimit-remaining-tokens"] == "300"


def test_a_request_larger_than_the_limit_is_never_retried() -> None:
    limiter = Limiter(Clock())
    with pytest.raises(RateLimited) as err:
        admit(limiter, key(tpm=100), 101)
    assert err.value.should_retry is False
    assert "Lower max_tokens" in err.value.message


def test_using_more_than_reserved_is_a_debt() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    k = key(tpm=600)
    admit(limiter, k, 100)
    release(limiter, k, 100, 700)  # 600 over the reservation
    with pytest.raises(RateLimited):
        admit(limiter, k, 1)
    clock.now += 60
    admit(limiter, k, 1)


def test_concurrency_limit() -> None:
    limiter = Limiter(Clock())
    k = key(max_concurrency=2)
    admit(limiter, k, 0)
    admit(limiter, k, 0)
    with pytest.raises(RateLimited) as err:
        admit(limiter, k, 0)
    assert "in flight" in err.value.message
    release(limiter, k, 0, 0)
    admit(limiter, k, 0)


def test_refusal_charges_nothing() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    k = key(rpm=10, tpm=100)
    with pytest.raises(RateLimited):
        admit(limiter, k, 500)
    assert limiter.headers(k)["x-ratelimit-remaining-requests"] == "10"


def test_limits_changed_at_run_time_are_followed() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    admit(limiter, key(rpm=10), 0)
    assert limiter.headers(key(rpm=2))["x-ratelimit-remaining-requests"] == "2"
    assert limiter.headers(key(rpm=2))["x-ratelimit-limit-requests"] == "2"
    assert limiter.headers(key()) == {}


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0201, "21ms"), (1.5, "1.5s"), (59.9999, "60s"), (360, "6m0s")]
)
def test_durations_read_like_openais(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_period_starts_in_utc() -> None:
    now = datetime(2026, 11, 19, 15, 30, tzinfo=UTC).timestamp()  # a Thursday
    assert period_start("day", now) == datetime(2026, 11, 19, tzinfo=UTC).timestamp()
    assert period_start("week", now) == datetime(2026, 11, 16, tzinfo=UTC).timestamp()
    assert period_start("month", now) == datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert period_start("total", now) == 0.0
    assert period_start(None, now) == 0.0


def test_budget_holds_reservations_and_rolls_over() -> None:
    day = datetime(2026, 11, 19, 23, 0, tzinfo=UTC).timestamp()
    clock = Clock(day)
    book = BudgetBook(clock)
    k = key(budget_tokens=1000, budget_usd=1.0, budget_period="day")
    assert book.needs_load(k)
    book.load(k, period_start("day", day), tokens=700, usd=0.1)
    assert not book.needs_load(k)
    book.reserve(k, (200, 0.01), (200, 0.01))
    with pytest.raises(QuotaExceeded) as err:
        book.reserve(k, (200, 0.01), (200, 0.01))  # 700 spent + 200 held + 200 > 1000
    assert err.value.message.startswith("API limit exceeded, upgrade your plan")
    assert "100 of 1000 tokens left this day" in err.value.message
    assert err.value.should_retry is False
    book.settle(k, (200, 0.01), (50, 0.001))
    book.reserve(k, (200, 0.01), (200, 0.01))
    spend = book.spent(k)
    assert spend is not None and (spend.tokens, spend.held_tokens) == (750, 200)
    clock.now += 3600  # midnight passed: a new day, a fresh budget (the 200 held still count)
    book.reserve(k, (800, 0.49), (800, 0.49))
    with pytest.raises(QuotaExceeded, match=r"\$0.5000 of \$1 left"):
        book.reserve(k, (0, 0.6), (0, 0.6))
    assert book.needs_load(key(budget_tokens=5, budget_period="week"))  # period changed


def test_unbudgeted_keys_are_not_tracked() -> None:
    book = BudgetBook(Clock())
    assert not book.needs_load(key(rpm=5))
    assert book.spent(key()) is None
