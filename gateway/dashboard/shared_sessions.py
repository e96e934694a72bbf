"""Dashboard sessions in Redis, for a gateway of several processes (`--workers N`, replicas).

In one process's memory (`SessionBook`), a session opened on one worker was unknown to the
others: every other page a browser opened went back to sign-in, a sign-out that landed on
another worker left the session open, and each worker counted failed sign-ins on its own.
Here (with `redis_url` set) every process reads the same sessions and the same count.

A session is a hash `tk:dash:s:<SHA-256 of its token>` (its CSRF token, the digest of the
admin key it was opened with, when it ends) that Redis expires when it ends; failed sign-ins
are a sorted set `tk:dash:failed` of their times. What `SessionBook` says of sessions holds
here, but the bound on how many are kept: each goes when it ends (only the admin key opens
one). Redis not answering is `SessionsUnavailable` (the dashboard says so, with a 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.dashboard.sessions import (
    FAILURE_WINDOW,
    MAX_FAILURES,
    Clock,
    Session,
    SessionsUnavailable,
    digest,
)

__all__ = ["SharedSessionBook"]

_PREFIX = "tk:dash:s:"
_FAILED = "tk:dash:failed"
_CLEAR_CHUNK = 500


class SharedSessionBook:
    """Every open dashboard session, in Redis, by the digest of its cookie token."""

    def __init__(self, redis: Redis, *, clock: Clock = time.time) -> None:
        self.redis = redis
        self.clock = clock
        self.turn = asyncio.Lock()  # this process's sign-in attempts, one at a time

    async def open(self, admin_key: str, ttl: float) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(
            csrf=secrets.token_urlsafe(32),
            expires=self.clock() + ttl,
            admin_digest=digest(admin_key),
        )
        name = _PREFIX + digest(token)
        async with _answered(), self.redis.pipeline(transaction=True) as pipe:
            fields: dict[Any, Any] = {
                "csrf": session.csrf,
                "admin": session.admin_digest,
                "expires": repr(session.expires),
            }
            await pipe.hset(name, mapping=fields)  # (queued)
            await pipe.pexpire(name, int(ttl * 1000) + 1)
            await pipe.execute()
        return token, session

    async def get(self, token: str | None, admin_key: str) -> Session | None:
        """The live session of a cookie token, if it was opened with the current admin key."""
        if not token:
            return None
        name = _PREFIX + digest(token)
        async with _answered():
            csrf, admin, expires = await self.redis.hmget(name, ["csrf", "admin", "expires"])
        if csrf is None or admin is None or expires is None:
            return None
        try:
            session: Session | None = Session(_text(csrf), float(expires), _text(admin))
        except (UnicodeDecodeError, ValueError):  # (not one we wrote)
            session = None
        if (
            session is None
            or session.expires <= self.clock()
            or not hmac.compare_digest(session.admin_digest, digest(admin_key))
        ):
            async with _answered():
                await self.redis.delete(name)
            return None
        return session

    async def close(self, token: str | None) -> None:
        if token:
            async with _answered():
                await self.redis.delete(_PREFIX + digest(token))

    async def clear(self) -> int:
        """End every session (a reload changed the admin key); how many there were."""
        ended = 0
        async with _answered():
            names: list[bytes] = []
            async for name in self.redis.scan_iter(match=_PREFIX + "*", count=_CLEAR_CHUNK):
                names.append(name)
                if len(names) >= _CLEAR_CHUNK:
                    ended += await self.redis.delete(*names)
                    names = []
            if names:
                ended += await self.redis.delete(*names)
        return ended

    async def failed(self) -> None:
        now = self.clock()
        async with _answered(), self.redis.pipeline(transaction=True) as pipe:
            await pipe.zadd(_FAILED, {f"{now!r}:{secrets.token_hex(4)}": now})  # (queued)
            await pipe.zremrangebyscore(_FAILED, "-inf", now - FAILURE_WINDOW)
            await pipe.expire(_FAILED, int(FAILURE_WINDOW) + 1)
            await pipe.execute()

    async def locked_for(self) -> float:
        """Seconds until sign-in is allowed again (0: it is), counting every process's
        failures."""
        now = self.clock()
        async with _answered():
            recent: list[Any] = await self.redis.zrangebyscore(
                _FAILED, f"({now - FAILURE_WINDOW!r}", "+inf", withscores=True
            )
        if len(recent) < MAX_FAILURES:
            return 0.0
        oldest = min(float(score) for _, score in recent)
        return max(0.0, oldest + FAILURE_WINDOW - now)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def _answered() -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise SessionsUnavailable(f"{type(exc).__name__}: {exc}") from exc
