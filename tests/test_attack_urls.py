"""Attack on the URL checks of 2026-12-07 (dburl.problem and redact, the config's URL checks)
and reload's `settings_changed`. Every test here failed on the commit it was written against
(2ab831e, where dburl had a `url_problem` that used urlsplit), for the reason its docstring
gives.

Two kinds of failure: URLs asyncpg (or redis-py) takes and that worked before the upgrade
are now refused (a deployment that no longer starts), and URL shapes whose password still
reaches the operator's output.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from structlog.testing import capture_logs

from gateway import cli
from gateway.config import load_settings
from gateway.database import open_database
from gateway.dburl import problem, redact
from gateway.store import StoreError
from tests.test_reload import Reloadable, current, setup  # noqa: F401 - the fixture

# Distinctive pieces of a password: neither may appear in any output.
HEAD, TAIL = "Kx9Head", "Tail42zz"


def _server_of(pg_url: str) -> tuple[int, str]:
    parts = urllib.parse.urlsplit(pg_url)
    assert parts.port is not None
    return parts.port, parts.path.lstrip("/")


# --- false refusals: URLs asyncpg takes, refused since the upgrade -------------------------


@pytest.mark.parametrize(
    "url",
    [
        # libpq's multi-host form (a primary and a standby, target_session_attrs picks): the
        # port after each host. url_problem() calls urlsplit().port, which fails on "5432,h2".
        "postgresql://kiosk:pw@db1.internal:5432,db2.internal:5433/kiosk",
        "postgresql://kiosk:pw@db1:5432,db2:5432/kiosk?target_session_attrs=read-write",
        "postgresql://kiosk:pw@[2001:db8::1]:5432,[2001:db8::2]:5432/kiosk",
        # An @ in a query parameter (Azure's user@server, an application name, a password
        # given as a parameter): asyncpg reads them with parse_qs, the @ is no problem.
        "postgresql://db.internal:5432/kiosk?user=kiosk@myserver&password=pw",
        "postgresql://db.internal:5432/kiosk?application_name=kiosk@box1",
    ],
)
def test_problem_accepts_urls_asyncpg_accepts(url: str) -> None:
    """dburl.problem() -> url_problem() refuses these ("what follows its host's colon is not a
    port" / "an @ after its host"), and with it load_settings (config.py:176) and
    open_database (database.py:78): `gateway serve` exits 2 on a config that ran yesterday."""
    assert problem(url) is None


async def test_a_multi_host_url_still_opens_the_database(pg_url: str) -> None:
    """A real server, reached through libpq's multi-host form: the first host refuses, the
    second is the server. asyncpg connects (and 3f07cb0 opened the store); now open_database
    raises StoreError before trying."""
    port, name = _server_of(pg_url)
    url = f"postgresql://postgres@127.0.0.1:1,127.0.0.1:{port}/{name}"
    store = await open_database(url)
    await store.close()


async def test_an_at_sign_in_a_query_parameter_still_opens_the_database(pg_url: str) -> None:
    port, name = _server_of(pg_url)
    url = f"postgresql://127.0.0.1:{port}/{name}?user=postgres&application_name=kiosk@box1"
    store = await open_database(url)
    await store.close()


@pytest.mark.parametrize(
    "redis_url",
    [
        # redis-py documents the password of a unix socket as a parameter; it reads a@b.
        "unix:///run/redis/redis.sock?db=1&password=pa@ss",
        "redis://127.0.0.1:6379/0?password=pa@ss",
    ],
)
def test_config_accepts_redis_urls_redis_py_accepts(tmp_path: Path, redis_url: str) -> None:
    """redis.connection.parse_url takes these (password "pa@ss"); config._redis_url_problem
    refuses them in url_problem's "an @ after its host" before asking redis-py."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\nredis_url = "{redis_url}"\n', encoding="utf-8")
    assert load_settings(config, {}).server.redis_url == redis_url


# --- leaks ---------------------------------------------------------------------------------


async def test_a_password_holding_at_and_colon_never_reaches_the_error() -> None:
    """asyncpg splits the user part at the FIRST @ (connect_utils: netloc.partition('@')),
    urlsplit at the last: problem() sees a fine URL, asyncpg reads host "db" and port
    "Tail42zz@127.0.0.1:1", and its ValueError quotes that; pg_store masks only the whole
    password, so the StoreError (printed by every command) holds the password's tail."""
    url = f"postgresql://kiosk:{HEAD}@db:{TAIL}@127.0.0.1:1/kiosk"
    with pytest.raises(StoreError) as caught:
        await asyncio.wait_for(open_database(url), 20)
    assert TAIL not in str(caught.value) and HEAD not in str(caught.value), caught.value


@pytest.mark.parametrize("sep", ["&", "#", ";"])
def test_redact_hides_a_password_parameter_holding_amp_hash_or_semicolon(sep: str) -> None:
    """_PASSWORD_PARAM stops at &, # and ;: `?password=Kx9Head;Tail42zz` is shown as
    `?password=***;Tail42zz` (asyncpg and redis-py read the whole `Kx9Head;Tail42zz`, parse_qs
    splits on & only), and the & and # forms show their tail too."""
    shown = redact(f"postgresql://db.example:5432/kiosk?password={HEAD}{sep}{TAIL}")
    assert TAIL not in shown and HEAD not in shown, shown


async def test_an_ampersand_in_a_password_parameter_never_reaches_the_error() -> None:
    """asyncpg's parse_qs(strict_parsing=True) raises "bad query field: 'Tail42zz'"; problem()
    let the URL through and pg_store masks only a user-part password."""
    url = f"postgresql://127.0.0.1:1/kiosk?user=kiosk&password={HEAD}&{TAIL}"
    with pytest.raises(StoreError) as caught:
        await asyncio.wait_for(open_database(url), 20)
    assert TAIL not in str(caught.value), caught.value


def test_migrate_never_prints_a_semicolon_password(
    pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL that works (the test server trusts every sign-in; asyncpg sends the whole
    "Kx9Head;Tail42zz"): `gateway migrate` prints redact(url) and with it "Tail42zz"."""
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    url = f"{pg_url}?password={HEAD};{TAIL}"
    assert cli.main(["migrate", "--db", url]) == 0
    out, err = capsys.readouterr()
    assert "schema up to date" in out
    assert TAIL not in out + err and HEAD not in out + err, out + err


# --- reload: settings_changed names fields it did not take ---------------------------------


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('redis_url = "redis://127.0.0.1:1/0"', "server.redis_url"),
        ('redis_failure = "local"', "server.redis_failure"),
        ("redis_timeout_seconds = 2.0", "server.redis_timeout_seconds"),
        ("listen_backlog = 64", "server.listen_backlog"),
        ("uvloop = false", "server.uvloop"),
    ],
)
async def test_a_field_bound_at_start_is_never_said_to_be_taken(
    setup: Reloadable,  # noqa: F811
    aiohttp_client: AiohttpClient,
    line: str,
    field: str,
) -> None:
    """These [server] fields are read once at start (limits_redis.open_gate in _keys_ctx,
    server._run's backlog, serve's loop factory) but are not in reload.RESTART_FIELDS: a
    reload logs no config_reload_needs_restart and config_reloaded says
    settings_changed=["server.redis_url"], "the fields it took" (docs/operations.md), while
    the running gate still counts limits in memory."""
    s = setup
    body = s.provider("a", s.a, "ka")
    await s.start(aiohttp_client, body)
    running = current(s.gw).settings.server
    s.write(body)
    s.path.write_text(
        s.path.read_text().replace("[server]\n", f"[server]\n{line}\n"), encoding="utf-8"
    )
    with capture_logs() as logs:
        assert await s.reload()
    reloaded = next(e for e in logs if e["event"] == "config_reloaded")
    assert field not in reloaded.get("settings_changed", []), reloaded
    warnings: list[Any] = [e for e in logs if e["event"] == "config_reload_needs_restart"]
    assert warnings and field in warnings[0]["fields"], logs
    name = field.split(".", 1)[1]
    assert getattr(current(s.gw).settings.server, name) == getattr(running, name)
