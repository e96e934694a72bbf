"""Configuration reload without a restart: on SIGHUP (or `gateway reload`), re-read the config.

The new config is loaded and checked off the event loop; if it fails, the error is logged and
the running config stays. Otherwise a new snapshot (providers, models, groups, routing) becomes
current for new requests, while requests and streams in flight finish on the one they started
with (`gateway.snapshot`). Providers and the breakers of accounts the reload did not change are
kept. `[server]` fields bound when the server started (address, database, body limit, log
level, background loop timings) keep their running values: a warning names those that changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import msgspec
import structlog
from aiohttp import web

from gateway import hangups
from gateway.config import naming
from gateway.dashboard.sessions import SessionBook, SessionsUnavailable
from gateway.dashboard.shared_sessions import SharedSessionBook
from gateway.settings import ConfigError, PriceSettings, Settings
from gateway.snapshot import build_snapshot
from gateway.state import DASHBOARD_SESSIONS_KEY, KEYS_KEY, LIVE_KEY, PRICES_KEY, RELOADER_KEY

__all__ = ["RESTART_FIELDS", "end_sessions", "reload_config", "reload_ctx"]

log = structlog.get_logger(__name__)

# `[server]` fields bound at start: a reload keeps their running values.
RESTART_FIELDS = (
    "host",
    "port",
    "database",
    "max_body_bytes",
    "log_level",
    "keys_refresh_seconds",
    "usage_flush_seconds",
    "usage_batch_size",
    "client_header_timeout",
    "uvloop",
    "listen_backlog",
    "redis_url",
    "redis_failure",
    "redis_timeout_seconds",
)


# `[metrics]` fields bound at start (the metrics are made once); `public` is reloadable.
METRICS_RESTART_FIELDS = ("enabled", "per_key", "max_keys", "max_models")
# `[prices]` is bound at start as a whole: the price list is loaded, and its updates started,
# once.
PRICES_RESTART_FIELDS = PriceSettings.__struct_fields__
_RESTART = (
    ("server", RESTART_FIELDS),
    ("metrics", METRICS_RESTART_FIELDS),
    ("prices", PRICES_RESTART_FIELDS),
)
# The sections of single settings whose other fields a reload takes (named in its log line).
_SETTINGS_SECTIONS = ("server", "metrics")


def _differing(
    old: Settings, new: Settings, sections: Iterable[tuple[str, Iterable[str]]]
) -> list[str]:
    """`section.field` of each of these fields whose value differs between two configs."""
    return [
        f"{section}.{f}"
        for section, fields in sections
        for f in fields
        if getattr(getattr(old, section), f) != getattr(getattr(new, section), f)
    ]


def _keep_startup_fields(running: Settings, new: Settings) -> Settings:
    changed = _differing(running, new, _RESTART)
    if changed:
        log.warning("config_reload_needs_restart", fields=changed)
    kept = {
        section: msgspec.structs.replace(
            getattr(new, section), **{f: getattr(getattr(running, section), f) for f in fields}
        )
        for section, fields in _RESTART
    }
    return msgspec.structs.replace(new, **kept)


def _changes(old: Settings, new: Settings) -> dict[str, list[str]]:
    """What a reload changes, by name, for its log line."""
    out: dict[str, list[str]] = {}
    for section in ("providers", "models", "groups"):
        before = {x.name: x for x in getattr(old, section)}
        after = {x.name: x for x in getattr(new, section)}
        for verb, names in (
            ("added", after.keys() - before.keys()),
            ("removed", before.keys() - after.keys()),
            ("changed", {n for n in after.keys() & before.keys() if after[n] != before[n]}),
        ):
            if names:
                out[f"{section}_{verb}"] = sorted(names)
    if old.routing != new.routing:
        out["routing"] = ["changed"]
    # Names only: a changed admin key's value never reaches the log.
    settings = _differing(
        old,
        new,
        ((section, getattr(old, section).__struct_fields__) for section in _SETTINGS_SECTIONS),
    )
    if settings:
        out["settings_changed"] = settings
    return out


async def reload_config(app: web.Application) -> bool:
    """Re-read the config and make it current for new requests.

    Returns:
        Whether the new config was taken; when not, the error is logged and the running
        config stays.
    """
    reloader = app[RELOADER_KEY]
    async with reloader.lock:
        try:
            return await _reload(app)
        finally:
            reloader.finished.set()


async def _reload(app: web.Application) -> bool:
    reloader, live = app[RELOADER_KEY], app[LIVE_KEY]
    try:
        loaded = await asyncio.to_thread(reloader.load)
        try:
            app[PRICES_KEY].check(loaded)
        except ConfigError as exc:
            raise naming(reloader.source(), exc) from None
    except ConfigError as exc:
        log.error("config_reload_failed", error=str(exc), kept="the running config")
        return False
    old = live.current
    settings = _keep_startup_fields(old.settings, loaded)
    try:
        snapshot = build_snapshot(settings, old)
    except Exception as exc:
        log.exception("config_reload_failed", error=str(exc), kept="the running config")
        return False
    try:
        await app[KEYS_KEY].regroup(settings.groups)
    except Exception as exc:  # the database failed: the key cache kept its groups
        live.discard(snapshot)
        log.exception("config_reload_failed", error=str(exc), kept="the running config")
        return False
    live.swap(snapshot)
    await _end_sessions(app, old.settings, settings)
    reloader.reloads += 1
    log.info("config_reloaded", **_changes(old.settings, settings))
    return True


async def _end_sessions(app: web.Application, old: Settings, new: Settings) -> None:
    """A new admin key (or none), or the dashboard turned off, ends every dashboard session
    not opened with the new key now: checked only when a session was next used, a key taken
    out and put back later would have brought the sessions of before back to life."""
    if old.server.admin_key != new.server.admin_key or not new.server.dashboard:
        keep = new.server.admin_key if new.server.dashboard else None
        await end_sessions(app[DASHBOARD_SESSIONS_KEY], keep)


async def end_sessions(book: SessionBook | SharedSessionBook, keep: str | None) -> None:
    """`book.clear(keep)`, logged; Redis not taking it is logged too (and owed by the book:
    sessions are refused until a later try gets through)."""
    try:
        ended = await book.clear(keep)
    except SessionsUnavailable as exc:
        log.warning("dashboard_sessions_not_ended", error=str(exc))
        return
    if ended:
        log.info("dashboard_sessions_ended", sessions=ended)


def _on_sighup(app: web.Application) -> None:
    reloader = app[RELOADER_KEY]
    if sum(not task.done() for task in reloader.tasks) >= 2:
        # Two unfinished: at most one is past the lock, so one waits for it and reads the
        # file after this signal, taking what this one would. (A stream of SIGHUPs queued a
        # task each, and a stop waited for every one.)
        return
    task = asyncio.get_running_loop().create_task(reload_config(app), name="config-reload")
    reloader.tasks.add(task)
    task.add_done_callback(reloader.tasks.discard)


async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """SIGHUP reloads the config while the app runs (where the platform has SIGHUP); see
    `gateway.hangups` for before and after."""
    loop = asyncio.get_running_loop()
    hangups.take(loop, _on_sighup, app)  # (a SIGHUP that came during the start: now)
    yield
    hangups.stop_taking()  # a stop ignores SIGHUP: it would end the process, rows unwritten
    tasks = app[RELOADER_KEY].tasks
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
