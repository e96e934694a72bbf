"""`create_app(settings)`: wires state, middlewares and routes; resources open in cleanup contexts.

The factory does no I/O, so tests build apps from their own settings and several apps can run
side by side. Cleanup contexts open in this order and close in reverse: store → usage writer
and refusal counter → prices → key cache → the config requests run on (providers, one HTTP
session per upstream, and the router: `gateway.snapshot`) → with `reload`, the SIGHUP handler
that re-reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from aiohttp import web

from gateway.brake import AdminBrake
from gateway.dashboard.sessions import SessionBook
from gateway.dashboard.shared_sessions import SharedSessionBook
from gateway.database import open_database
from gateway.gauges import app_gauges
from gateway.keys import KeyCache
from gateway.limits_redis import SharedGate, open_gate
from gateway.metrics import Metrics
from gateway.middleware import running_requests
from gateway.prices import open_book, start_price_updates
from gateway.providers._pool import PoolGate
from gateway.records import KeyRecord
from gateway.refusals import RefusalCounter
from gateway.reload import end_sessions, reload_ctx
from gateway.routes import setup_routes
from gateway.settings import Settings
from gateway.snapshot import LiveConfig, Reloader, build_snapshot
from gateway.sse_pings import PING_SECONDS, StreamPings
from gateway.state import (
    ADMIN_BRAKE_KEY,
    DASHBOARD_SESSIONS_KEY,
    GATE_KEY,
    INFLIGHT_KEY,
    KEYS_KEY,
    LIVE_KEY,
    METRICS_KEY,
    PINGS_KEY,
    PRICES_KEY,
    REFUSALS_KEY,
    RELOADER_KEY,
    SETTINGS_KEY,
    SHUTTING_DOWN_KEY,
    STORE_KEY,
    STORED_KEY,
    STORED_SHARE_KEY,
    STREAMS_KEY,
    USAGE_KEY,
)
from gateway.stored import StoredResponses
from gateway.stored_share import StoredShare
from gateway.usage import UsageRecorder

__all__ = ["create_app"]

# The server's one database connection serves every query in turn: a statement must not wait
# long for another process's lock (usage writes are retried, admin writes answered 503).
_BUSY_TIMEOUT = 0.25


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = await open_database(app[SETTINGS_KEY].server.database, busy_timeout=_BUSY_TIMEOUT)
    app[STORE_KEY] = store
    yield
    await store.close()


async def _usage_ctx(app: web.Application) -> AsyncIterator[None]:
    server = app[SETTINGS_KEY].server
    recorder = UsageRecorder(
        app[STORE_KEY], flush_seconds=server.usage_flush_seconds, batch_size=server.usage_batch_size
    )
    app[USAGE_KEY] = recorder
    refusals = app[REFUSALS_KEY] = RefusalCounter(
        app[STORE_KEY], flush_seconds=server.usage_flush_seconds
    )
    share = app[STORED_SHARE_KEY] = StoredShare(
        app[STORE_KEY], app[STORED_KEY], flush_seconds=server.usage_flush_seconds
    )
    await recorder.start()
    await refusals.start()
    await share.start()
    yield
    await share.stop()
    await refusals.stop()
    await recorder.stop()  # drains: no usage row is lost on a clean stop


async def _prices_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    app[PRICES_KEY] = await asyncio.to_thread(open_book, settings)
    if not (settings.prices.database and settings.prices.update):
        yield
        return
    updater = await asyncio.to_thread(start_price_updates, settings.prices)
    yield
    await asyncio.to_thread(updater.stop)


# How long a stop waits for the start's clear of other keys' dashboard sessions to end.
_CLEAR_AT_STOP_SECONDS = 5.0


async def _keys_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    gate = app[GATE_KEY] = open_gate(settings.server, app[STORE_KEY])
    clearing: asyncio.Task[None] | None = None
    if isinstance(gate, SharedGate):  # every worker and replica shares the sessions too
        book = app[DASHBOARD_SESSIONS_KEY] = SharedSessionBook(gate.redis)
        # Sessions of another key end (a key changed by a restart, as by a reload), off the
        # start (it walks Redis's keys): dashboard requests meanwhile wait for it.
        server = settings.server
        keep = server.admin_key if server.dashboard else None
        book.ask_clear(keep)
        clearing = asyncio.create_task(end_sessions(book, keep), name="dashboard-sessions-clear")
    gate.running = running_requests(app[INFLIGHT_KEY])
    recorder = app[USAGE_KEY]

    async def sync_budgets(keys: list[KeyRecord]) -> None:
        await gate.sync(keys, recorder)

    cache = KeyCache(
        app[STORE_KEY],
        settings.server.keys_refresh_seconds,
        groups=settings.groups,
        on_load=sync_budgets,
    )
    await cache.load()
    app[KEYS_KEY] = cache
    task = asyncio.create_task(cache.run(), name="key-cache-refresh")
    gate.start()
    yield
    if clearing is not None:  # (a process stopped at once still ends the old sessions)
        await asyncio.wait([clearing], timeout=_CLEAR_AT_STOP_SECONDS)
    for running in (task, clearing):
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    await gate.close()


async def _config_ctx(app: web.Application) -> AsyncIterator[None]:
    live = app[LIVE_KEY] = LiveConfig(build_snapshot(app[SETTINGS_KEY]))
    yield
    await live.close()


async def _pings_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[PINGS_KEY].close()


async def _wind_down(app: web.Application) -> None:
    """On shutdown (the listening sockets are already closed): let in-flight requests and
    streams finish within the grace period, then end the streams still open with an error
    event. aiohttp then cancels whatever else is left."""
    app[SHUTTING_DOWN_KEY].set()
    tasks = app[INFLIGHT_KEY]
    inflight = list(tasks)
    grace = app[LIVE_KEY].current.settings.server.shutdown_grace_seconds
    if inflight and grace > 0:
        await asyncio.wait(inflight, timeout=grace)
    # No new upstream request from now on: one waiting for a connection slot would get the
    # slot of a stream ended below, and open a stream the shutdown cuts a moment later.
    for snapshot in app[LIVE_KEY].snapshots():
        for provider in snapshot.providers.values():
            if isinstance(gate := getattr(provider, "pool", None), PoolGate):
                gate.shut()
    open_streams: set[asyncio.Task[Any]] = app[STREAMS_KEY]
    for task in list(open_streams):
        if not task.done():
            task.cancel()


def create_app(
    settings: Settings,
    *,
    reload: Callable[[], Settings] | None = None,
    config_file: Callable[[], str | None] | None = None,
) -> web.Application:
    """Build the gateway application for `settings`. No I/O happens until it starts.

    Args:
        reload: how to re-read the config (blocking: it reads the file; raises ConfigError);
            with it, SIGHUP reloads the config while the app runs (`gateway.reload`).
        config_file: which file `reload` reads (asked at each reload), named in its errors.
    """
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS_KEY] = settings
    app[STREAMS_KEY] = set()
    app[PINGS_KEY] = StreamPings(PING_SECONDS)
    app[SHUTTING_DOWN_KEY] = asyncio.Event()
    app[INFLIGHT_KEY] = {}
    app[STORED_KEY] = StoredResponses()
    app[DASHBOARD_SESSIONS_KEY] = SessionBook()
    app[ADMIN_BRAKE_KEY] = AdminBrake()
    if settings.metrics.enabled:
        models = [m.name for m in settings.models]
        app[METRICS_KEY] = Metrics(settings.metrics, models, partial(app_gauges, app))
    app.on_shutdown.append(_wind_down)
    app.cleanup_ctx.extend(
        [_store_ctx, _usage_ctx, _prices_ctx, _keys_ctx, _config_ctx, _pings_ctx]
    )
    if reload is not None:
        app[RELOADER_KEY] = Reloader(reload, config_file or (lambda: None))
        app.cleanup_ctx.append(reload_ctx)
    setup_routes(app)
    return app
