"""Dashboard sign-ins: server-side sessions, their CSRF tokens, and a brake on guessing.

A session is a random 256-bit token in a cookie (`HttpOnly`, `SameSite=Strict`, path
`/dashboard`); the server keeps only its SHA-256, with a second random token that every form
must send back (CSRF). A session ends when it is signed out, when it expires, when the gateway
restarts (this book's, in memory), or when the admin key changes (it remembers a digest of the
key it was opened with, and a reload that changes the key or turns the dashboard off ends them
all at once).
Failed sign-ins are counted: past a few a minute, sign-in is refused for the rest of it.

`SessionBook` keeps them in this process's memory; with `redis_url` set, `SharedSessionBook`
(`dashboard/shared_sessions.py`) keeps them in Redis, where every worker and replica finds
them. Both answer the same (async) calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "FAILURE_WINDOW",
    "MAX_FAILURES",
    "Session",
    "SessionBook",
    "SessionsUnavailable",
    "digest",
]

Clock = Callable[[], float]

_MAX_SESSIONS = 1000  # the oldest is dropped past this: memory stays bounded
FAILURE_WINDOW = 60.0
MAX_FAILURES = 5  # per window, for the whole gateway (whoever guesses, it is one admin key)


class SessionsUnavailable(Exception):
    """Where the sessions are kept (Redis) does not answer."""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(slots=True)
class Session:
    csrf: str
    expires: float
    admin_digest: str

    def csrf_matches(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self.csrf.encode())


class SessionBook:
    """Every open dashboard session, by the digest of its cookie token."""

    def __init__(self, *, clock: Clock = time.time, failure_clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.failure_clock = failure_clock  # (never steps back: a lock outlasts no window)
        self._sessions: dict[str, Session] = {}
        self._failures: deque[tuple[float, str]] = deque()  # (when, ticket)
        self.turn = asyncio.Lock()  # sign-in attempts, one at a time (gateway.dashboard.guard)

    async def open(self, admin_key: str, ttl: float) -> tuple[str, Session]:
        """A new session for `ttl` seconds: its cookie token (never stored) and the session."""
        self._expire()
        while len(self._sessions) >= _MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        token = secrets.token_urlsafe(32)
        session = Session(
            csrf=secrets.token_urlsafe(32),
            expires=self.clock() + ttl,
            admin_digest=digest(admin_key),
        )
        self._sessions[digest(token)] = session
        return token, session

    async def get(self, token: str | None, admin_key: str) -> Session | None:
        """The live session of a cookie token, if it was opened with the current admin key."""
        if not token:
            return None
        key = digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires <= self.clock() or not hmac.compare_digest(
            session.admin_digest, digest(admin_key)
        ):
            del self._sessions[key]
            return None
        return session

    async def close(self, token: str | None) -> None:
        if token:
            self._sessions.pop(digest(token), None)

    async def clear(self, keep: str | None = None) -> int:
        """End every session not opened with the admin key `keep` (every one, without): a
        reload changed the admin key. How many ended."""
        kept = None if keep is None else digest(keep)
        ended = [k for k, s in self._sessions.items() if s.admin_digest != kept]
        for key in ended:
            del self._sessions[key]
        return len(ended)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]

    # Guessing the admin key

    async def attempt(self) -> tuple[float, str]:
        """Before a presented key is compared: `(seconds to wait, "")` while sign-in is
        locked, else `(0, ticket)`. The attempt counts as a failure from now on, unless
        `succeeded(ticket)` takes it back: guesses sent at once never get past the limit."""
        now = self.failure_clock()
        while self._failures and self._failures[0][0] <= now - FAILURE_WINDOW:
            self._failures.popleft()
        if len(self._failures) >= MAX_FAILURES:
            return min(self._failures[0][0] + FAILURE_WINDOW - now, FAILURE_WINDOW), ""
        ticket = secrets.token_hex(8)
        self._failures.append((now, ticket))
        return 0.0, ticket

    async def succeeded(self, ticket: str) -> None:
        """The attempt of `ticket` was the right key: it is not a failure."""
        for entry in self._failures:
            if entry[1] == ticket:
                self._failures.remove(entry)
                return
