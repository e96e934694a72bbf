"""Every virtual key in memory, by the SHA-256 digest of its secret, refreshed from the store.

API keys have enough entropy that a fast hash is safe, and a dict lookup keeps the database off
the request path. The cache polls the store's `data_version` (SQLite: `PRAGMA data_version`)
so keys created, changed or revoked by the CLI (another connection) or another replica take
effect within `keys_refresh_seconds`; PostgreSQL also notifies it at once (LISTEN/NOTIFY).
Keys are held as they are enforced: merged with their config group's defaults (`with_group`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec
import structlog

from gateway.database import Database
from gateway.logs import FailureStreak
from gateway.records import LIMIT_FIELDS, KeyRecord
from gateway.settings import GroupConfig

__all__ = ["KeyCache", "Principal", "digest_of", "with_group"]

log = structlog.get_logger(__name__)


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 (`_sha2` from 3.12, `_sha256` before), else hashlib's.

    hashlib's goes through OpenSSL's EVP layer (a digest fetched, a context made and freed,
    engine checks): for one short key on a cold cache, as every request's first lines run
    after the loop slept, that was about 5 us of the request's latency; the built-in one is
    a few hundred instructions. Same digests (tests/test_store.py)."""
    for name in ("_sha2", "_sha256"):
        try:
            found: Callable[[bytes], Any] = importlib.import_module(name).sha256
        except (ImportError, AttributeError):
            continue
        return found
    return hashlib.sha256  # pragma: no cover (every CPython has one of the two)


_sha256 = _builtin_sha256()


def digest_of(secret: str) -> str:
    # surrogateescape: aiohttp decodes non-UTF-8 header bytes that way; such a key is unknown.
    digest: str = _sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
    return digest


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the key record the request authenticated with. (A Struct: a frozen
    dataclass sets its field through `object.__setattr__`, on every request.)"""

    key: KeyRecord


def with_group(key: KeyRecord, groups: Mapping[str, GroupConfig]) -> KeyRecord:
    """The key as it is enforced: its group's limits, budget and models where it sets none."""
    group = groups.get(key.group_name) if key.group_name else None
    if group is None:
        return key
    changes: dict[str, object] = {
        name: getattr(group, name)
        for name in LIMIT_FIELDS
        if getattr(key, name) is None and getattr(group, name) is not None
    }
    if not key.models and group.models:
        changes["models"] = group.models
    return msgspec.structs.replace(key, **changes) if changes else key


OnLoad = Callable[[list[KeyRecord]], Awaitable[None]]


class KeyCache:
    """Every key, by digest, in memory; `run()` keeps it in step with the database.

    Keys are held as enforced: merged with their config group's defaults. `on_load` runs on
    the new keys before they replace the old ones (the budget book reads their spending).
    """

    def __init__(
        self,
        store: Database,
        refresh_seconds: float,
        *,
        groups: Iterable[GroupConfig] = (),
        on_load: OnLoad | None = None,
    ) -> None:
        self._store = store
        self._refresh = refresh_seconds
        self._groups = {g.name: g for g in groups}
        self._on_load = on_load
        self._by_digest: dict[str, KeyRecord] = {}
        self._changed_meanwhile: dict[str, KeyRecord] = {}
        self._version: int | None = None
        self.loads = 0  # completed (re)loads, observable by tests and metrics
        self._loaded = asyncio.Event()
        self._loading = asyncio.Lock()
        # Set when the database says the keys changed (PostgreSQL's NOTIFY): reload now.
        self._poked = asyncio.Event()
        store.on_change(self._poked.set)
        self._failures = FailureStreak()  # refreshes failed in a row (the database down)

    async def load(self) -> None:
        async with self._loading:  # one at a time: a poll's load must not undo a regroup's
            await self._load()

    async def _load(self) -> None:
        version = await self._store.data_version()
        self._changed_meanwhile = {}  # admin changes that land while this load awaits
        keys = [with_group(k, self._groups) for k in await self._store.list_keys()]
        unknown = {k.group_name for k in keys if k.group_name and k.group_name not in self._groups}
        if unknown:
            log.warning("key_groups_not_configured", groups=sorted(unknown))
        if self._on_load is not None:
            # A key the admin API changed while this load read the table is synced as it is
            # now (its spending loaded already), not as read: that would drop its new budget.
            changed = self._changed_meanwhile
            await self._on_load([changed.get(k.digest, k) for k in keys] if changed else keys)
        by_digest = {k.digest: k for k in keys}
        by_digest.update(self._changed_meanwhile)  # newer than this load's snapshot
        self._by_digest = by_digest
        self._version = version  # only now: a failed load is tried again at the next poll
        self.loads += 1
        self._loaded.set()

    async def regroup(self, groups: Iterable[GroupConfig]) -> None:
        """Apply a reloaded config's groups: every key is merged with them again. On failure
        (the database), the cache keeps its groups and keys."""
        async with self._loading:
            previous = self._groups
            self._groups = {g.name: g for g in groups}
            try:
                await self._load()
            except BaseException:
                self._groups = previous
                raise

    async def wait_reload(self, after: int) -> None:
        """Wait until the cache has been (re)loaded more than `after` times."""
        while self.loads <= after:
            self._loaded.clear()
            await self._loaded.wait()

    async def refresh(self) -> None:
        """Reload when another connection changed the database since the last load."""
        version = await self._store.data_version()
        if version != self._version:
            await self.load()

    async def run(self) -> None:
        while True:
            # Poll every `refresh_seconds` (the safety net), sooner when the database says so.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh):
                    await self._poked.wait()
            self._poked.clear()
            try:
                await self.refresh()
            except Exception as exc:  # keep serving from the last good cache
                failures = self._failures
                if failures.failed():
                    if failures.failures == 1:  # its traceback once, then a line a minute
                        log.exception("key_cache_refresh_failed")
                    else:
                        log.error(
                            "key_cache_refresh_failing",
                            failures=failures.failures,
                            error=f"{type(exc).__name__}: {exc}",
                        )
            else:
                ended = self._failures.ended()
                if ended:
                    log.info("key_cache_refresh_recovered", failures=ended)

    def with_groups(self, key: KeyRecord) -> KeyRecord:
        """The key as it is enforced (its group's defaults applied)."""
        return with_group(key, self._groups)

    def put(self, key: KeyRecord) -> KeyRecord:
        """Apply a change made through this process (admin API) without waiting for a poll."""
        key = self._by_digest[key.digest] = with_group(key, self._groups)
        self._changed_meanwhile[key.digest] = key
        return key

    def current(self, key: KeyRecord) -> KeyRecord:
        """The key as enforced now (`key` itself if the cache no longer has it): one dict
        lookup, for a request whose key may have changed since it authenticated."""
        return self._by_digest.get(key.digest, key)

    def records(self) -> list[KeyRecord]:
        """Every key as enforced (for the metrics' key names)."""
        return list(self._by_digest.values())

    def lookup(self, secret: str) -> KeyRecord | None:
        digest = digest_of(secret)
        key = self._by_digest.get(digest)
        # The dict lookup hashes the digest, not the secret; compare anyway in constant time.
        if key is not None and hmac.compare_digest(key.digest, digest):
            return key
        return None
