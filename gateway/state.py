"""Every typed key the application and its requests carry, in one place."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from gateway.admission import Gate, Ticket
    from gateway.brake import AdminBrake
    from gateway.dashboard.sessions import Session, SessionBook
    from gateway.dashboard.shared_sessions import SharedSessionBook
    from gateway.database import Database
    from gateway.keys import KeyCache, Principal
    from gateway.metrics import Metrics
    from gateway.prices import PriceBook
    from gateway.refusals import RefusalCounter
    from gateway.settings import Settings
    from gateway.snapshot import LiveConfig, Reloader, Snapshot
    from gateway.sse_pings import StreamPings
    from gateway.stored import StoredResponses
    from gateway.stored_share import StoredShare
    from gateway.usage import UsageRecorder

__all__ = [
    "DASHBOARD_SESSIONS_KEY",
    "DASHBOARD_SESSION_KEY",
    "GATE_KEY",
    "INFLIGHT_KEY",
    "KEYS_KEY",
    "LIVE_KEY",
    "METRICS_KEY",
    "PINGS_KEY",
    "PRICES_KEY",
    "PRINCIPAL_KEY",
    "REFUSALS_KEY",
    "RELOADER_KEY",
    "SETTINGS_KEY",
    "SHUTTING_DOWN_KEY",
    "SNAPSHOT_KEY",
    "STORED_KEY",
    "STORED_SHARE_KEY",
    "STORE_KEY",
    "STREAMS_KEY",
    "TICKET_KEY",
    "USAGE_KEY",
]

# The settings the app started with (its cleanup contexts read them). What requests run on,
# reloadable, is the current snapshot of LIVE_KEY, taken once per request as SNAPSHOT_KEY.
SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings")
LIVE_KEY: web.AppKey[LiveConfig] = web.AppKey("live_config")
# How the config is re-read on SIGHUP (set by `gateway serve`; absent: no reload).
RELOADER_KEY: web.AppKey[Reloader] = web.AppKey("reloader")
STORE_KEY: web.AppKey[Database] = web.AppKey("store")
USAGE_KEY: web.AppKey[UsageRecorder] = web.AppKey("usage")
KEYS_KEY: web.AppKey[KeyCache] = web.AppKey("keys")
# Rate limits and budgets of every key (memory only on the request path).
GATE_KEY: web.AppKey[Gate] = web.AppKey("gate")
# Model prices from the price database (config prices come with each request's snapshot).
PRICES_KEY: web.AppKey[PriceBook] = web.AppKey("prices")
# Refused requests, counted per minute, key and status instead of a usage row each.
REFUSALS_KEY: web.AppKey[RefusalCounter] = web.AppKey("refusals")
# Prometheus metrics of this app (absent with `[metrics] enabled = false`).
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics")
# Tasks serving open SSE streams, so shutdown can end them with an error event (each
# removes itself as its stream ends: a plain set, cheaper per stream than a WeakSet).
STREAMS_KEY: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams")
# The open SSE streams' keep-alive pings, from one task (see sse_pings.py).
PINGS_KEY: web.AppKey[StreamPings] = web.AppKey("pings")
# Tasks serving any request and their requests, so shutdown can wait for them (up to the grace
# period) and a concurrency limit given to a key counts those of its requests running
# (`admission.Gate.adopt`). (A dict costs a request a few nanoseconds more than a set.)
INFLIGHT_KEY: web.AppKey[dict[asyncio.Task[Any], web.Request]] = web.AppKey("inflight")
# Set when the server begins to shut down; streams ended then say why.
SHUTTING_DOWN_KEY: web.AppKey[asyncio.Event] = web.AppKey("shutting_down")

# Dashboard sign-ins (memory only: a restart signs everyone out), and a page's own session.
DASHBOARD_SESSIONS_KEY: web.AppKey[SessionBook | SharedSessionBook] = web.AppKey(
    "dashboard_sessions"
)
DASHBOARD_SESSION_KEY: web.RequestKey[Session] = web.RequestKey("dashboard_session")

# What upstreams store that passed through: its keys and sizes (`gateway.stored`), and its
# writes to and look-ups in the database (`gateway.stored_share`).
STORED_KEY: web.AppKey[StoredResponses] = web.AppKey("stored_responses")
STORED_SHARE_KEY: web.AppKey[StoredShare] = web.AppKey("stored_share")
# Wrong admin keys per client address (memory only), and the addresses locked out.
ADMIN_BRAKE_KEY: web.AppKey[AdminBrake] = web.AppKey("admin_brake")

PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("principal")
SNAPSHOT_KEY: web.RequestKey[Snapshot] = web.RequestKey("snapshot")
# What an admitted request holds of its key's limits and budget (see gateway.intake); None
# for a key without limits.
TICKET_KEY: web.RequestKey[Ticket | None] = web.RequestKey("ticket")
