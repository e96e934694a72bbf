"""The config a request runs on: settings, providers and router, swapped whole on a reload.

`middleware.gateway` takes the current `Snapshot` once per request and holds it until the request
(or its stream) ends, so a request never mixes two configs. `LiveConfig` is the one swap
point: it holds the current snapshot and the retired ones that requests still use, and closes
a provider's HTTP session once no snapshot in use holds that provider. A reload reuses the
provider (and its connection pool) of every provider whose config did not change.
`Reloader` is how a running app re-reads its config (`gateway.reload`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from gateway.providers import Provider, build_provider
from gateway.providers._connector import upstream_connector
from gateway.router import Router
from gateway.settings import ProviderConfig, Settings, UpstreamConfig

__all__ = ["LiveConfig", "Reloader", "Snapshot", "build_snapshot"]

# aiohttp's default. Events are split by our own decoder, which takes lines of any length,
# so nothing needs a larger read buffer, and it bounds what aiohttp holds per connection:
# with 1 MiB it inflated a compressed answer in 1 MiB steps into a 2 MiB buffer (a bomb
# cost twice its limit; a hundred at once, over a gigabyte).
_READ_BUFSIZE = 2**16


@dataclass(eq=False, slots=True)
class Snapshot:
    """One config as requests use it. `users` counts the requests running on it."""

    settings: Settings
    router: Router
    providers: dict[str, Provider]
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    users: int = 0
    # Set once it is retired, its requests are done and the sessions only it held are closed.
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def _session(cfg: UpstreamConfig) -> aiohttp.ClientSession:
    # No cookie jar: a cookie an upstream sets for one client's request must not ride along
    # on another's (and matching cookies cost time on every request).
    return aiohttp.ClientSession(
        connector=upstream_connector(),
        read_bufsize=_READ_BUFSIZE,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def build_snapshot(settings: Settings, previous: Snapshot | None = None) -> Snapshot:
    """The providers, sessions and router of `settings`. Providers whose config equals one of
    `previous` are reused with their session, and the breakers of unchanged accounts are
    kept (`BreakerBoard.adopt`). No I/O: sessions connect on first use."""
    providers: dict[str, Provider] = {}
    sessions: dict[str, aiohttp.ClientSession] = {}
    for cfg in settings.providers:
        kept = _reusable(previous, cfg)
        if kept is not None:
            providers[cfg.name] = kept
            if previous is not None and cfg.name in previous.sessions:
                sessions[cfg.name] = previous.sessions[cfg.name]
            continue
        session = _session(cfg) if isinstance(cfg, UpstreamConfig) else None
        if session is not None:
            sessions[cfg.name] = session
        providers[cfg.name] = build_provider(cfg, session)
    router = Router(settings, providers)
    if previous is not None:
        router.breakers.adopt(previous.router.breakers)
    return Snapshot(settings, router, providers, sessions)


def _reusable(previous: Snapshot | None, cfg: ProviderConfig) -> Provider | None:
    if previous is None:
        return None
    provider = previous.providers.get(cfg.name)
    return provider if provider is not None and provider.config == cfg else None


class LiveConfig:
    """The current snapshot, and the retired ones requests still run on."""

    def __init__(self, current: Snapshot) -> None:
        self.current = current
        self._retired: list[Snapshot] = []
        self._closing: set[asyncio.Task[None]] = set()

    def enter(self) -> Snapshot:
        """The snapshot a new request runs on, held until `leave()`."""
        snapshot = self.current
        snapshot.users += 1
        return snapshot

    def leave(self, snapshot: Snapshot) -> None:
        snapshot.users -= 1
        if snapshot.users == 0 and snapshot is not self.current:
            self._collect()

    def swap(self, snapshot: Snapshot) -> Snapshot:
        """Make `snapshot` current for new requests; returns the one it replaces, whose
        requests finish on it."""
        old, self.current = self.current, snapshot
        self._retired.append(old)
        self._collect()
        return old

    def snapshots(self) -> list[Snapshot]:
        """The current snapshot and the retired ones requests still run on."""
        return [self.current, *self._retired]

    def discard(self, snapshot: Snapshot) -> None:
        """Close what a snapshot that never became current opened."""
        self._close(snapshot, self._in_use())

    def _in_use(self) -> set[int]:
        live = [self.current, *(s for s in self._retired if s.users)]
        return {id(session) for s in live for session in s.sessions.values()}

    def _collect(self) -> None:
        drained = [s for s in self._retired if not s.users]
        if not drained:
            return
        self._retired = [s for s in self._retired if s.users]
        in_use = self._in_use()
        for snapshot in drained:
            self._close(snapshot, in_use)

    def _close(self, snapshot: Snapshot, in_use: set[int]) -> None:
        sessions = [s for s in snapshot.sessions.values() if id(s) not in in_use]
        task = asyncio.get_running_loop().create_task(_close(snapshot, sessions))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every session (the app is stopping)."""
        snapshots = (self.current, *self._retired)
        sessions = {id(s): s for snap in snapshots for s in snap.sessions.values()}
        for session in sessions.values():
            await session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close(snapshot: Snapshot, sessions: list[aiohttp.ClientSession]) -> None:
    try:
        for session in sessions:
            await session.close()
    finally:
        snapshot.closed.set()


class Reloader:
    """How the app re-reads its config: `load` (blocking: it reads a file) builds Settings
    the way the server's own start did, or raises ConfigError; `source` says which file it
    reads (None: the embedded default; asked at each reload, as `load` looks again), named
    first in an error found beyond `load` (a provider's `pricing` the price database lacks),
    as `load` names its own."""

    def __init__(
        self, load: Callable[[], Settings], source: Callable[[], str | None] = lambda: None
    ) -> None:
        self.load = load
        self.source = source
        self.lock = asyncio.Lock()  # one reload at a time, in order
        self.tasks: set[asyncio.Task[bool]] = set()
        self.reloads = 0  # reloads taken, observable by tests and operators
        self.finished = asyncio.Event()  # set whenever a reload (taken or not) has ended
