"""Dashboard sessions in Redis, for a gateway of several processes (`--workers N`, replicas).

In one process's memory (`SessionBook`), a session opened on one worker was unknown to the
others: every other page a browser opened went back to sign-in, a sign-out that landed on
another worker left the session open, and each worker counted failed sign-ins on its own.
Here (with `redis_url` set) every process reads the same sessions and the same count.

A session is a hash `tk:dash:s:<SHA-256 of its token>` (its CSRF token, when it ends, and an
HMAC of both and of its name keyed with the admin key) that Redis expires when it ends. The
HMAC is what makes it a session: whoever can write Redis but does not know the admin key can
neither make one nor stretch one, and a session made under another admin key (a replica
reloaded before this one) is refused but left alone. Failed sign-ins are a sorted set
`tk:dash:failed` of their times on Redis's clock, counted and added to in one script so that
processes guessing at once never get past the limit. Redis not answering is
`SessionsUnavailable` (the dashboard says so, with a 503).

A reload that changes the admin key ends every session not sealed with the new one (`clear`),
and so does a process starting: a key changed by a restart ends the old key's sessions too,
and putting the old key back later brings none back. A clear Redis does not take is not
forgotten: until it gets through, this process refuses every session (with a 503) and tries
again. What it cannot survive is this process restarting before then with the old key back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from gateway.background import mark_seen
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
_CLEAR_RETRY_SECONDS = 1.0
# Redis not answering, or answering what redis-py cannot parse (not Redis, or out of step).
_NOT_ANSWERED = (
    *(RedisError, OSError, TimeoutError),
    *(AttributeError, IndexError, KeyError, TypeError, ValueError),
)
_FIELDS = ["csrf", "admin", "expires"]

# Adds this attempt to the failures of the last window, on Redis's own clock (the processes'
# clocks may disagree); past the limit takes it back and answers how long to wait. Failures
# timed after now (a clock that stepped back, a score written from elsewhere, even `inf`)
# count as made now, and the set expires a window after every attempt: nothing locks sign-in
# longer than one window. A key of another type (written by someone else) is dropped first.
# The add is the first write that can be refused: Redis refusing writes (maxmemory, a
# read-only replica) refuses it, and the script stops there.
_ATTEMPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local kind = redis.call('TYPE', KEYS[1])
if type(kind) == 'table' then kind = kind['ok'] end
if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local after = string.format('(%.17g', now)
local ahead = redis.call('ZRANGEBYSCORE', KEYS[1], after, '+inf', 'LIMIT', 0, tonumber(ARGV[2]) + 1)
redis.call('ZREMRANGEBYSCORE', KEYS[1], after, '+inf')
for _, member in ipairs(ahead) do redis.call('ZADD', KEYS[1], now, member) end
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
if redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[3])
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = tonumber(oldest[2]) + window - now
  if not (wait <= window) then wait = window end
  if wait < 0.001 then wait = 0.001 end
  return tostring(wait)
end
return '0'
"""


class SharedSessionBook:
    """Every open dashboard session, in Redis, by the digest of its cookie token."""

    def __init__(self, redis: Redis, *, clock: Clock = time.time) -> None:
        self.redis = redis
        self.clock = clock
        self.turn = asyncio.Lock()  # this process's sign-in attempts, one at a time
        self._attempt = redis.register_script(_ATTEMPT)
        self._owed = False  # a clear that Redis did not take yet: sessions are refused
        self._keep: str | None = None  # (the admin key whose sessions that clear keeps)
        self._asked = 0  # clears asked for: one asked while another runs runs after it
        self._clearing: asyncio.Task[int] | None = None
        self._retry_at = 0.0  # (monotonic) a clear that failed is not tried again before

    async def open(self, admin_key: str, ttl: float) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        name = _PREFIX + digest(token)
        csrf = secrets.token_urlsafe(32)
        expires = repr(self.clock() + ttl)
        session = Session(csrf, float(expires), _seal(admin_key, name, csrf, expires))
        async with _answered(), self.redis.pipeline(transaction=True) as pipe:
            fields: dict[Any, Any] = {
                "csrf": csrf,
                "admin": session.admin_digest,
                "expires": expires,
            }
            await pipe.hset(name, mapping=fields)  # (queued)
            await pipe.pexpire(name, int(ttl * 1000) + 1)
            await pipe.execute()
        return token, session

    async def get(self, token: str | None, admin_key: str) -> Session | None:
        """The live session of a cookie token, if it was opened with the current admin key."""
        await self._settle()
        if not token:
            return None
        name = _PREFIX + digest(token)
        try:
            async with _answered():
                fields = await self.redis.hmget(name, _FIELDS)
        except SessionsUnavailable as exc:
            if not _wrong_type(exc):
                raise
            async with _answered():  # (not a hash: not one we wrote, under our name)
                await self.redis.delete(name)
            return None
        session = _sealed(name, fields, admin_key)
        if session is None:
            return None  # forged, or of another admin key: left to its own end
        if not session.expires > self.clock():  # (an ended one Redis has not dropped yet)
            async with _answered():
                await self.redis.delete(name)
            return None
        return session

    async def close(self, token: str | None) -> None:
        if token:
            async with _answered():
                await self.redis.delete(_PREFIX + digest(token))

    async def clear(self, keep: str | None = None) -> int:
        """End every session not sealed with `keep` (every one, without): a reload that
        changed the admin key keeps those of the new key, opened on a replica reloaded
        before this one; and a process starting ends those of another key, as a reload
        would have. How many ended.

        Until it gets through, every session is refused (`get` tries again first)."""
        self.ask_clear(keep)
        return await self._settle()

    def ask_clear(self, keep: str | None) -> None:
        """Owe `clear(keep)`: from now on, a session is looked at only once it went through.
        Two clears owed at once that keep different keys are both met only by ending every
        session (A, B, A while Redis does not answer: the first one's A must end)."""
        if self._owed and keep != self._keep:
            keep = None
        self._owed, self._keep = True, keep
        self._asked += 1
        self._retry_at = 0.0

    async def _settle(self) -> int:
        """Run the clear owed, if any: one at a time, every caller meanwhile waiting for
        the same one (and none cancelled with a caller that hangs up). One that failed is
        tried again a second later at the soonest: until then callers are refused at once
        (each try walks Redis's keys)."""
        ended = 0
        while self._owed:
            if self._clearing is None or self._clearing.done():
                if time.monotonic() < self._retry_at:
                    raise SessionsUnavailable("ending the sessions failed; tried again soon")
                self._clearing = asyncio.create_task(self._end_others(self._keep, self._asked))
                self._clearing.add_done_callback(mark_seen)
            try:
                ended += await asyncio.shield(self._clearing)
            except SessionsUnavailable:
                self._retry_at = time.monotonic() + _CLEAR_RETRY_SECONDS
                raise
        return ended

    async def _end_others(self, keep: str | None, asked: int) -> int:
        ended = 0
        async with _answered():
            names: list[bytes] = []
            async for name in self.redis.scan_iter(match=_PREFIX + "*", count=_CLEAR_CHUNK):
                names.append(name)
                if len(names) >= _CLEAR_CHUNK:
                    ended += await self._drop(names, keep)
                    names = []
            if names:
                ended += await self._drop(names, keep)
        if asked == self._asked:  # (not if another was asked for meanwhile: that one next)
            self._owed = False
        return ended

    async def _drop(self, names: list[bytes], keep: str | None) -> int:
        """End those of `names` not sealed with `keep`; how many."""
        if keep is not None:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    await pipe.hmget(name, _FIELDS)  # (queued)
                replies = await pipe.execute(raise_on_error=False)
            names = [
                name
                for name, fields in zip(names, replies, strict=True)
                # (not a hash, or none of our fields, or not sealed with `keep`: not one
                # we wrote, or not to keep; and one gone since is no harm to delete)
                if isinstance(fields, Exception)
                or _sealed(name.decode("utf-8", "surrogateescape"), fields, keep) is None
            ]
        return await self.redis.delete(*names) if names else 0

    async def attempt(self) -> tuple[float, str]:
        """As `SessionBook.attempt`, counted with every process's attempts."""
        await self._settle()
        ticket = secrets.token_hex(8)
        async with _answered():
            wait = float(
                _text(
                    await self._attempt(keys=[_FAILED], args=[FAILURE_WINDOW, MAX_FAILURES, ticket])
                )
            )
        return (wait, "") if wait > 0 else (0.0, ticket)

    async def succeeded(self, ticket: str) -> None:
        async with _answered():
            await self.redis.zrem(_FAILED, ticket)


def _seal(admin_key: str, name: str, csrf: str, expires: str) -> str:
    """What binds a session to the admin key it was opened with (and to its own name,
    CSRF token and end): only who knows the key can make it."""
    message = f"{name}\n{csrf}\n{expires}".encode("utf-8", "surrogateescape")
    key = admin_key.encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _sealed(name: str, fields: list[Any], admin_key: str) -> Session | None:
    """The session in a hash, if `admin_key` sealed it."""
    try:
        csrf, seal, expires = (_text(field) for field in fields if field is not None)
        session = Session(csrf, float(expires), seal)
    except (UnicodeDecodeError, ValueError):  # (not one we wrote)
        return None
    expected = _seal(admin_key, name, csrf, expires)
    return session if hmac.compare_digest(seal.encode(), expected.encode()) else None


def _wrong_type(exc: SessionsUnavailable) -> bool:
    return isinstance(exc.__cause__, ResponseError) and str(exc.__cause__).startswith("WRONGTYPE")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def _answered() -> AsyncIterator[None]:
    try:
        yield
    except _NOT_ANSWERED as exc:
        raise SessionsUnavailable(f"{type(exc).__name__}: {exc}") from exc
