"""The Keys pages: the list with budget use, creating a key (its secret shown once), a key's
detail (usage by model, latency, refusals), editing it, and revoking it after a confirmation.

Changes go through `gateway.keyops`, as the admin API's do: the same checks, and the running
key cache sees them at once.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from gateway import keyops
from gateway.budgets import period_start
from gateway.dashboard import queries
from gateway.dashboard.guard import form, redirect, render, signed_in
from gateway.dashboard.pages import DAY, chart, fresh, period_of
from gateway.errors import GatewayError, InvalidRequest
from gateway.keybody import body_of
from gateway.records import BudgetPeriod, KeyRecord
from gateway.state import KEYS_KEY, STORE_KEY

__all__ = ["confirm_revoke", "create_key", "key_detail", "keys", "revoke_key", "update_key"]

# The form's fields, by the name the admin API gives them; all but `name` may be left empty.
_FIELDS: tuple[str, ...] = ("name", "models", "rpm", "tpm", "max_concurrency", "budget_tokens")
_FIELDS += ("budget_usd", "budget_period", "expires_at", "group", "notes")
_TEXT = ("name", "notes")  # empty is a value, not "no limit"
# A key's page draws this many series at most (its models with the most tokens, then the rest
# together) and lists this many models (those with the most requests): its clients choose
# the model ids, and 20,000 of them made a page of 18 MB, rendered on the event loop.
MAX_CHART_SERIES = 8
# The Keys page lists this many keys at a time: each is a query and a spending look-up, and
# 5,000 in one page held the event loop for half a second while it was rendered.
KEYS_PER_PAGE = 50
_PAGE_NUMBER = re.compile(r"[0-9]{1,9}")
MAX_MODEL_ROWS = 50
OTHER_MODELS = "(other models)"


def _when_text(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _next_reset(period: BudgetPeriod | None, now: float) -> float | None:
    """When a budget period that holds `now` ends (None: it never does)."""
    if period in (None, "total"):
        return None
    start = period_start(period, now)
    ahead = {"day": 1, "week": 7, "month": 32}[period] * DAY
    return period_start(period, start + ahead) if period == "month" else start + ahead


async def _row(
    request: web.Request, key: KeyRecord, used: dict[str, float], now: float
) -> dict[str, Any]:
    enforced = request.app[KEYS_KEY].with_groups(key)
    view = await keyops.view(request, key)
    spend = view.get("spend")
    budget = None
    if spend is not None and (enforced.budget_usd or enforced.budget_tokens):
        if enforced.budget_usd:
            spent, limit, unit = spend["usd"], enforced.budget_usd, "usd"
        else:
            spent, limit, unit = spend["tokens"], enforced.budget_tokens or 1, "tokens"
        budget = {
            "spent": spent,
            "limit": limit,
            "unit": unit,
            # Over budget is a full bar (no division: a budget of 1e-320 made it infinite).
            "percent": 100 if spent >= limit else round(100 * spent / limit),
            "resets": _next_reset(enforced.budget_period, now),
        }
    status = "revoked" if key.revoked_at else ("active" if key.usable_at(now) else "expired")
    return {
        "key": key,
        "enforced": enforced,
        "status": status,
        "budget": budget,
        "last_used": used.get(key.id),
    }


def _form_values(key: KeyRecord | None) -> dict[str, str]:
    """A form's fields filled in from a key (empty for a new one)."""
    if key is None:
        return dict.fromkeys(_FIELDS, "")
    values = {f: getattr(key, f) for f in _FIELDS if f not in ("group", "models", "expires_at")}
    shown = {f: "" if v is None else str(v) for f, v in values.items()}
    shown.update(
        group=key.group_name or "",
        models=", ".join(key.models),
        expires_at=_when_text(key.expires_at),
    )
    return shown


def _body(fields: dict[str, str], kind: type[msgspec.Struct], *, new: bool) -> msgspec.Struct:
    """A `KeyCreate` or `KeyUpdate` from a form. Empty fields: defaults for a new key, cleared
    limits for a change. Raises InvalidRequest for what the API would refuse (lax conversion
    reads "inf" as a float, which `keybody.checked` refuses as the API's JSON cannot say it)."""
    data: dict[str, Any] = {}
    for name in _FIELDS:
        if name not in fields:
            continue
        text = fields[name].strip()
        if name == "models":
            data[name] = [m for m in text.replace(",", " ").split() if m]
        elif text or name in _TEXT:  # (empty text is a value; an empty number, no limit)
            data[name] = text
        elif not new:
            data[name] = None
    return body_of(data, kind, strict=False)


def _page_number(request: web.Request) -> int:
    """`?page=`, from 1 (absent: 1). Raises InvalidRequest for anything else."""
    text = request.query.get("page", "1")
    if not _PAGE_NUMBER.fullmatch(text) or int(text) < 1:
        raise InvalidRequest("'page' must be a whole number from 1.", param="page")
    return int(text)


async def _page(request: web.Request, **extra: Any) -> web.Response:
    """The Keys page: `KEYS_PER_PAGE` keys, newest first (past the last page: the last)."""
    number = _page_number(request)
    await fresh(request)
    now = time.time()
    records = (await request.app[STORE_KEY].list_keys())[::-1]  # newest first
    pages = max(1, -(-len(records) // KEYS_PER_PAGE))
    number = min(number, pages)
    shown = records[(number - 1) * KEYS_PER_PAGE : number * KEYS_PER_PAGE]
    used = await queries.last_used(request.app[STORE_KEY], [k.id for k in shown])
    rows = [await _row(request, k, used, now) for k in shown]
    extra.setdefault("values", _form_values(None))
    extra.setdefault("error", None)
    paging = {"number": number, "pages": pages, "count": len(records)}
    return render(request, "keys.html", nav="keys", rows=rows, paging=paging, **extra)


@signed_in
async def keys(request: web.Request) -> web.StreamResponse:
    """`GET /dashboard/keys`."""
    return await _page(request)


@signed_in
async def create_key(request: web.Request) -> web.StreamResponse:
    """`POST /dashboard/keys`: the page again, with the new key's secret (shown this once)."""
    fields = await form(request)
    try:
        view, secret = await keyops.create(request, _body(fields, keyops.KeyCreate, new=True))
    except GatewayError as exc:
        values = {f: fields.get(f, "") for f in _FIELDS}
        return await _page(request, values=values, error=str(exc))
    created = {"id": view["id"], "name": view["name"], "secret": secret}
    return render(request, "created.html", nav="keys", created=created)


async def _detail(request: web.Request, key: KeyRecord, **extra: Any) -> web.Response:
    await fresh(request)
    db = request.app[STORE_KEY]
    name, since, until, step = period_of(request, default="30d")
    starts, by_model = await queries.key_series(
        db, key.id, since, until, step, limit=MAX_CHART_SERIES - 1
    )
    series = {OTHER_MODELS if m is None else m: tokens for m, tokens in by_model.items()}
    per_model, overall = await db.key_summary(key.id, since=since, until=until)
    more_models = max(0, len(per_model) - MAX_MODEL_ROWS)
    if more_models:  # the busiest, still in name order
        busiest = sorted(per_model, key=lambda r: (-r.requests, r.group))[:MAX_MODEL_ROWS]
        per_model = sorted(busiest, key=lambda r: r.group)
    used = await queries.last_used(db, [key.id])
    extra.setdefault("values", _form_values(key))
    extra.setdefault("error", None)
    extra.setdefault("saved", request.query.get("saved") == "1")
    return render(
        request,
        "key.html",
        nav="keys",
        row=await _row(request, key, used, time.time()),
        period=name,
        periods=["24h", "7d", "30d", "90d", "365d"],
        step="hour" if step == 3600 else "day",
        usage_chart=chart(starts, series),
        per_model=per_model,
        more_models=more_models,
        overall=overall,
        refusals=await queries.refusals_of(db, key.id),
        **extra,
    )


@signed_in
async def key_detail(request: web.Request) -> web.StreamResponse:
    """`GET /dashboard/keys/{key_id}`."""
    key = await request.app[STORE_KEY].require_key(request.match_info["key_id"])
    return await _detail(request, key)


@signed_in
async def update_key(request: web.Request) -> web.StreamResponse:
    """`POST /dashboard/keys/{key_id}`: save the edit form, then back to the key's page."""
    key = await request.app[STORE_KEY].require_key(request.match_info["key_id"])
    fields = await form(request)
    if fields.get("expires_at", "").strip() == _when_text(key.expires_at):
        fields.pop("expires_at", None)  # unchanged (and perhaps past: leave it be)
    try:
        await keyops.update(request, key.id, _body(fields, keyops.KeyUpdate, new=False))
    except GatewayError as exc:
        values = {f: fields.get(f, "") for f in _FIELDS}
        return await _detail(request, key, values=values, error=str(exc))
    return redirect(f"/dashboard/keys/{key.id}?saved=1")


@signed_in
async def confirm_revoke(request: web.Request) -> web.StreamResponse:
    """`GET /dashboard/keys/{key_id}/revoke`: are you sure?"""
    key = await request.app[STORE_KEY].require_key(request.match_info["key_id"])
    return render(request, "revoke.html", nav="keys", key=key)


@signed_in
async def revoke_key(request: web.Request) -> web.StreamResponse:
    """`POST /dashboard/keys/{key_id}/revoke`: revoke for good."""
    view = await keyops.revoke(request, request.match_info["key_id"])
    return redirect(f"/dashboard/keys/{view['id']}")
