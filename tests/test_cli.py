"""The `gateway` command line, run in-process against a temporary database: a SQLite file and
a PostgreSQL database in turn (the `database` fixture)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from gateway import cli, server as server_module
from gateway.database import opened_database
from gateway.records import UsageRecord
from gateway.state import SETTINGS_KEY
from tests.conftest import NEVER_HANG, free_port, start_serve


class Run:
    """Calls `cli.main` with `--db` pointing at a temp database; returns (status, out, err)."""

    def __init__(self, db: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.db = db
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        status = cli.main([*argv, "--db", str(self.db)])
        out, err = self.capsys.readouterr()
        return status, out, err

    def json(self, *argv: str) -> Any:
        status, out, err = self(*argv, "--json")
        assert status == 0, err
        return json.loads(out)


@pytest.fixture
def run(database: str, capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(database, capsys)


def test_keys_round_trip_json(run: Run) -> None:
    limits = ("--rpm", "60", "--budget-usd", "2.5", "--budget-period", "month")
    created = run.json("keys", "create", "--name", "alice", "--models", "demo, openai/*", *limits)
    secret = created.pop("key")
    assert secret.startswith("sk-kiosk-")
    assert created["id"].startswith("key_") and created["name"] == "alice"
    assert created["models"] == ["demo", "openai/*"]
    assert (created["rpm"], created["budget_usd"], created["budget_period"]) == (60, 2.5, "month")
    assert created["prefix"] == secret[:12] and "digest" not in created

    key_id = created["id"]
    assert run.json("keys", "list") == [created]
    assert run.json("keys", "show", key_id) == created

    updated = run.json("keys", "update", key_id, "--rpm", "none", "--tpm", "1000",
                       "--models", "", "--name", "alice2")  # fmt: skip
    assert (updated["rpm"], updated["tpm"], updated["models"]) == (None, 1000, [])
    assert updated["name"] == "alice2" and updated["budget_usd"] == 2.5  # untouched
    assert updated["updated_at"] >= created["updated_at"]

    revoked = run.json("keys", "revoke", key_id)
    assert revoked["revoked_at"] is not None
    assert run.json("keys", "revoke", key_id) == revoked  # idempotent
    assert run.json("keys", "show", key_id)["revoked_at"] == revoked["revoked_at"]


def test_keys_round_trip_text(run: Run) -> None:
    status, out, _ = run("keys", "create", "--name", "bob", "--tpm", "500", "--expires", "30d")
    assert status == 0
    lines = out.strip().splitlines()
    secret = lines[-1]  # the last line of stdout, for scripts
    assert secret.startswith("sk-kiosk-") and out.count(secret) == 1
    fields = dict(line.split(None, 1) for line in lines[:-1] if line and " " in line)
    key_id = fields["id"]
    assert fields["name"] == "bob" and fields["tpm"] == "500" and fields["models"] == "all"

    status, out, _ = run("keys", "list")
    header, line = out.splitlines()
    assert header.split() == ["ID", "NAME", "PREFIX", "STATUS", "MODELS", "RPM", "TPM", "CONC",
                              "BUDGET", "EXPIRES"]  # fmt: skip
    assert line.split()[:7] == [key_id, "bob", secret[:12], "active", "all", "-", "500"]
    assert header.index("NAME") == line.index("bob")  # columns line up

    status, out, _ = run("keys", "update", key_id, "--clear-expires", "--max-concurrency", "3")
    assert status == 0 and "never" in out and "3" in out
    status, out, _ = run("keys", "revoke", key_id)
    assert status == 0 and "revoked" in out
    status, out, _ = run("keys", "list")
    assert " revoked " in out


def test_secret_is_printed_only_by_create(run: Run) -> None:
    status, out, _ = run("keys", "create", "--name", "carol")
    secret = out.strip().splitlines()[-1]
    key_id = run.json("keys", "list")[0]["id"]
    outputs = [
        run("keys", "list"),
        run("keys", "list", "--json"),
        run("keys", "show", key_id),
        run("keys", "show", key_id, "--json"),
        run("keys", "update", key_id, "--rpm", "5"),
        run("keys", "revoke", key_id, "--json"),
        run("usage"),
        run("usage", "--json"),
    ]
    for status, out, err in outputs:
        assert status == 0, err
        assert secret not in out + err and secret[12:] not in out + err


def test_created_key_is_stored_hashed(run: Run) -> None:
    secret = run.json("keys", "create", "--name", "dave")["key"]
    if run.db.startswith("postgresql://"):

        async def dump() -> bytes:
            async with opened_database(run.db) as db:
                return b"".join(str(k).encode() for k in await db.list_keys())

        raw = asyncio.run(dump())
    else:
        raw = b"".join(p.read_bytes() for p in Path(run.db).parent.glob("keys.db*"))
    assert secret.encode() not in raw
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw


def test_unknown_key_id_exits_1(run: Run) -> None:
    for argv in (
        ["keys", "show", "key_nope"],
        ["keys", "revoke", "key_nope"],
        ["keys", "update", "key_nope", "--rpm", "1"],
        ["usage", "--key", "key_nope"],
    ):
        status, out, err = run(*argv)
        assert (status, out) == (1, "")
        assert "key_nope" in err


def test_update_without_changes_exits_2(run: Run) -> None:
    key_id = run.json("keys", "create", "--name", "erin")["id"]
    status, _, err = run("keys", "update", key_id)
    assert status == 2 and "nothing to change" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create"],  # --name is required
        ["keys", "create", "--name", "x", "--rpm", "0"],
        ["keys", "create", "--name", "x", "--rpm", "lots"],
        ["keys", "create", "--name", "x", "--budget-period", "fortnight"],
        ["keys", "create", "--name", "x", "--expires", "yesterday"],
        ["keys", "create", "--name", "x", "--expires", "2001-01-01"],
        ["keys", "update", "key_x", "--expires", "1d", "--clear-expires"],
        ["usage", "--by", "provider"],
    ],
)
def test_bad_arguments_exit_2(run: Run, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(*argv)
    assert info.value.code == 2


def test_parse_expires_and_since() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert cli.parse_expires("30d", now) == now + 30 * 86400
    assert cli.parse_expires("12h", now) == now + 12 * 3600
    assert cli.parse_expires("90m", now) == now + 90 * 60
    assert cli.parse_expires("1.5w", now) == now + 1.5 * 7 * 86400
    assert cli.parse_since("7d", now) == now - 7 * 86400
    future = datetime(2100, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    assert cli.parse_expires("2100-01-02T03:04:05Z", now) == future
    assert cli.parse_expires("2100-01-02T03:04:05", now) == future  # naive means UTC
    assert cli.parse_expires("2100-01-02T05:04:05+02:00", now) == future
    assert cli.parse_since("2100-01-02", now) == datetime(2100, 1, 2, tzinfo=UTC).timestamp()
    for bad in ("", "30", "30y", "soon", "-1d"):
        with pytest.raises(ValueError, match="duration"):
            cli.parse_expires(bad, now)
    with pytest.raises(ValueError, match="future"):
        cli.parse_expires("1999-12-31", now)


def test_expires_option_sets_expiry(run: Run) -> None:
    before = time.time()
    created = run.json("keys", "create", "--name", "f", "--expires", "12h")
    assert before + 12 * 3600 <= created["expires_at"] <= time.time() + 12 * 3600
    updated = run.json("keys", "update", created["id"], "--expires", "2100-01-01T00:00:00Z")
    assert updated["expires_at"] == datetime(2100, 1, 1, tzinfo=UTC).timestamp()
    assert run.json("keys", "update", created["id"], "--clear-expires")["expires_at"] is None


def seed_usage(db: str, key_id: str) -> None:
    now = time.time()

    def rec(**fields: Any) -> UsageRecord:
        base: dict[str, Any] = {"ts": now - 60, "request_id": "r", "key_id": key_id,
                                "model": "demo", "provider": "demo", "upstream_model": "demo",
                                "endpoint": "/v1/chat/completions", "stream": False,
                                "status": 200}  # fmt: skip
        return UsageRecord(**(base | fields))

    async def write() -> None:
        async with opened_database(db) as store:
            await store.insert_usage(
                [
                    rec(prompt_tokens=10, completion_tokens=20, total_tokens=30, latency_ms=10),
                    rec(model="gpt", status=502, latency_ms=30, cost_usd=0.125),
                    rec(key_id="key_other", ts=now - 30 * 86400, latency_ms=5),
                ]
            )

    asyncio.run(write())


def stored_as(db: str, key_id: str, **fields: Any) -> None:
    """Change a key in its store directly, past the checks of the CLI and the admin API."""

    async def write() -> None:
        async with opened_database(db) as store:
            await store.update_key(key_id, **fields)

    asyncio.run(write())


def test_usage_report(run: Run) -> None:
    key_id = run.json("keys", "create", "--name", "g")["id"]
    seed_usage(run.db, key_id)

    rows = run.json("usage")
    assert [(r["group"], r["requests"], r["errors"]) for r in rows] == [
        (key_id, 2, 1),
        ("key_other", 1, 0),
    ]
    mine = rows[0]
    assert (mine["total_tokens"], mine["cost_usd"], mine["p50_latency_ms"]) == (30, 0.125, 20.0)

    assert [r["group"] for r in run.json("usage", "--since", "7d")] == [key_id]
    by_model = run.json("usage", "--key", key_id, "--by", "model")
    assert [(r["group"], r["requests"]) for r in by_model] == [("demo", 1), ("gpt", 1)]
    by_day = run.json("usage", "--by", "day")
    assert len(by_day) == 2 and all(len(r["group"]) == 10 for r in by_day)

    _, out, _ = run("usage", "--by", "model")
    header, *lines = out.splitlines()
    assert header.split() == ["MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL",
                              "COST_USD", "P50_MS", "P95_MS"]  # fmt: skip
    assert lines[0].split() == ["demo", "2", "0", "10", "20", "30", "0.0000", "7.5", "9.8"]
    assert lines[1].split()[:3] == ["gpt", "1", "1"]
    assert len({len(line) for line in [header, *lines]}) == 1  # right-aligned numbers


def test_usage_by_key_names_each_key(run: Run) -> None:
    """Key names beside the ids, in the table and the JSON; a key since deleted (or none) has
    none."""
    key_id = run.json("keys", "create", "--name", "team")["id"]
    # A name with a terminal escape in it, as one made before such names were refused.
    stored_as(run.db, key_id, name="team\x1b[31mred")
    seed_usage(run.db, key_id)
    rows = run.json("usage")
    assert [(r["group"], r["name"]) for r in rows] == [
        (key_id, "team\x1b[31mred"),
        ("key_other", None),
    ]
    assert all(r["name"] is None for r in run.json("usage", "--by", "model"))
    _, out, _ = run("usage")
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["KEY", "NAME", "REQUESTS"]
    assert lines[0].split()[:4] == [key_id, "team\\x1b[31mred", "2", "1"]  # escaped, not raw
    assert lines[1].split()[:3] == ["key_other", "-", "1"]
    assert len({len(line) for line in [header, *lines]}) == 1


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "gateway.toml"
    bad.write_text("[server]\nport = 'eighty'\n")
    for argv in (["keys", "list"], ["usage"], ["serve"]):
        assert cli.main([*argv, "--config", str(bad)]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("gateway: config error: ") and "server.port" in err
    assert cli.main(["keys", "list", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    # An explicit --config is checked even when --db makes it unnecessary.
    assert cli.main(["keys", "list", "--config", str(bad), "--db", str(tmp_path / "k.db")]) == 2


def test_db_option_needs_no_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[[providers]]\nname = "o"\ntype = "openai"\napi_keys = ["env:UNSET_KEY"]\n')
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))  # would fail: UNSET_KEY is not set
    monkeypatch.delenv("UNSET_KEY", raising=False)
    assert cli.main(["keys", "list"]) == 2
    assert cli.main(["keys", "list", "--db", str(tmp_path / "k.db")]) == 0


def test_database_path_comes_from_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "from-config.db"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{db}"\n\n[[providers]]\nname = "demo"\ntype = "demo"\n\n'
        '[[models]]\nname = "demo"\ntargets = [{ provider = "demo", model = "demo" }]\n'
    )
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    assert cli.main(["keys", "create", "--name", "h", "--config", str(config)]) == 0
    assert db.is_file()
    capsys.readouterr()
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    assert cli.main(["keys", "list", "--json"]) == 0
    assert [k["name"] for k in json.loads(capsys.readouterr().out)] == ["h"]


def test_serve_applies_overrides_and_runs_the_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, Any] = {}

    def fake_serve(app: web.Application, host: str, port: int, announce: Any) -> None:
        calls.update(app=app, host=host, port=port)
        announce()  # what serve does once bound

    monkeypatch.setattr(server_module, "serve", fake_serve)
    monkeypatch.setattr(cli, "configure_logging", lambda level: calls.setdefault("level", level))
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./gateway.toml: the embedded default
    db = str(tmp_path / "serve.db")
    assert cli.main(["serve", "--host", "::1", "--port", "9123", "--db", db]) == 0
    server = calls["app"][SETTINGS_KEY].server
    assert (server.host, server.port, server.database) == ("::1", 9123, db)
    assert (calls["host"], calls["port"]) == ("::1", 9123)
    assert calls["level"] == "info"
    out, err = capsys.readouterr()
    assert err == "Token Kiosk listening on http://[::1]:9123\n" and out == ""


def test_serve_rejects_a_bad_port() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--port", "70000"])
    assert info.value.code == 2


def test_unusable_database_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_bytes(b"just some text, not SQLite " * 10)
    for db in (tmp_path / "no-such-dir" / "keys.db", not_a_db):
        assert cli.main(["keys", "list", "--db", str(db)]) == 1
        assert capsys.readouterr().err.startswith("gateway: database error: ")


def test_groups_and_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{tmp_path / "g.db"}"\n\n[[groups]]\nname = "team"\nrpm = 10\n'
    )
    base = ["--config", str(config), "--json"]
    assert (
        cli.main(["keys", "create", "--name", "a", "--group", "team", "--notes", "hi", *base]) == 0
    )
    created = json.loads(capsys.readouterr().out)
    assert (created["group"], created["notes"], created["rpm"]) == ("team", "hi", None)
    assert cli.main(["keys", "create", "--name", "b", "--group", "ghost", *base]) == 2
    assert "No group named 'ghost'" in capsys.readouterr().err
    update = ["keys", "update", created["id"], "--group", "none", "--notes", "none", *base]
    assert cli.main(update) == 0
    updated = json.loads(capsys.readouterr().out)
    assert (updated["group"], updated["notes"]) == (None, "")


def test_usage_until(run: Run) -> None:
    key_id = run.json("keys", "create", "--name", "g")["id"]
    seed_usage(run.db, key_id)
    everything = run.json("usage")
    assert sum(r["requests"] for r in everything) == 3
    assert run.json("usage", "--until", "1d") == [
        r for r in everything if r["group"] == "key_other"
    ]


def test_migrate(run: Run) -> None:
    status, out, err = run("migrate")
    assert status == 0, err
    assert out.strip().endswith("schema up to date")
    assert run("migrate")[0] == 0  # nothing left to do is no error


@pytest.mark.parametrize("budget", ["inf", "Infinity", "1e999", "nan"])
def test_keys_refuse_a_budget_the_admin_api_refuses(run: Run, budget: str) -> None:
    """`float()` reads these, so the CLI stored an infinite (or NaN) budget that the admin API
    and the dashboard refuse, and that the API then showed as `null`, as if there were none."""
    # (NaN is refused for not being > 0, the others for not being finite.)
    status, out, err = run("keys", "create", "--name", "x", "--budget-usd", budget)
    assert (status, out) == (2, "")
    assert err.startswith("gateway: Invalid --budget-usd: "), err
    key_id = run.json("keys", "create", "--name", "y", "--budget-usd", "5")["id"]
    status, out, err = run("keys", "update", key_id, "--budget-usd", budget)
    assert (status, out) == (2, "")
    assert err.startswith("gateway: Invalid --budget-usd: "), err
    assert [(k["name"], k["budget_usd"]) for k in run.json("keys", "list")] == [("y", 5.0)]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--notes", "n" * 2001),
        ("--name", "n" * 201),
        ("--models", "demo," + "m" * 257),
        ("--rpm", str(2**63)),
    ],
)
def test_keys_apply_the_admin_apis_bounds(run: Run, option: str, value: str) -> None:
    """The CLI took notes, names and allow-list entries of any length (and numbers SQLite cannot
    hold, refused only by the store): it checks the admin API's body type now, naming the
    option."""
    name = ["--name", "x"] if option != "--name" else []
    status, out, err = run("keys", "create", *name, option, value)
    assert (status, out) == (2, "")
    assert err.startswith(f"gateway: Invalid {option}: "), err
    key_id = run.json("keys", "create", "--name", "y", "--notes", "kept")["id"]
    status, out, err = run("keys", "update", key_id, option, value)
    assert (status, out) == (2, "")
    assert err.startswith(f"gateway: Invalid {option}: "), err
    assert [(k["name"], k["notes"]) for k in run.json("keys", "list")] == [("y", "kept")]


@pytest.mark.parametrize("option", ["--name", "--notes"])
def test_keys_refuse_a_bidirectional_override(run: Run, option: str) -> None:
    name = ["--name", "x"] if option != "--name" else []
    status, out, err = run("keys", "create", *name, option, "key-for-\u202eved")
    assert (status, out) == (2, "")
    assert err.startswith(f"gateway: Invalid {option}: control characters"), err
    assert run.json("keys", "list") == []


def test_keys_take_notes_as_long_as_the_admin_api_does(run: Run) -> None:
    created = run.json("keys", "create", "--name", "x", "--notes", "n" * 2000)
    assert len(created["notes"]) == 2000
    updated = run.json("keys", "update", created["id"], "--notes", "m" * 2000)
    assert updated["notes"] == "m" * 2000


@pytest.mark.parametrize(
    "error",
    [
        cli.StoreError("cannot connect to PostgreSQL: the server went away"),
        asyncpg.exceptions.InsufficientPrivilegeError("permission denied for table usage"),
    ],
    ids=["store", "postgres"],
)
def test_a_workers_database_error_names_no_password(
    error: Exception,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker of `serve --workers N` whose database fails says so in one line, as the single
    server does: the password in a PostgreSQL URL is never printed, and PostgreSQL's own errors
    are a line too, not a traceback (the parent then stops the other workers)."""

    def failing_serve(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(server_module, "serve", failing_serve)
    monkeypatch.setattr(cli.workers, "watch_parent", lambda app, fd: None)
    monkeypatch.setattr(cli.workers, "worker_socket", lambda fd: None)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    url = "postgresql://kiosk:s3cret-pass@db.internal:5432/kiosk"
    assert cli.main(["serve", "--db", url, "--worker-fd", "7,8,9"]) == 1
    out, err = capsys.readouterr()
    assert "s3cret-pass" not in out + err
    assert err == (
        f"gateway: database error (postgresql://kiosk:***@db.internal:5432/kiosk): {error}\n"
    )


def test_reload_refuses_a_pricing_the_price_database_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gateway reload` checks what the server would refuse, before it signals anything: a
    provider's `pricing` the price database does not have (the server would log
    config_reload_failed while the command said it had sent the signal)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    config = tmp_path / "gateway.toml"
    provider = '[[providers]]\nname = "o"\ntype = "openai"\npricing = "{}"\n'
    config.write_text(provider.format("nosuchco"))
    assert cli.main(["reload", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gateway: config error: {config}: providers.o.pricing: 'nosuchco'"), err
    config.write_text(provider.format("openai"))  # a known one: on to finding the server
    assert cli.main(["reload", "--config", str(config)]) == 1
    assert "no running server found" in capsys.readouterr().err


def test_serve_with_workers_refuses_an_unknown_pricing_as_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent refuses it before any worker starts: exit 2 and the config error, as a
    single server does (each worker failed on it, and the parent exited 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[server]\nredis_url = "redis://127.0.0.1:1/0"\n\n'
        '[[providers]]\nname = "o"\ntype = "openai"\npricing = "nosuchco"\n'
    )
    assert cli.main(["serve", "--workers", "2", "--config", str(config), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gateway: config error: {config}: providers.o.pricing: 'nosuchco'"), err


async def test_serve_names_the_config_file_in_a_pricing_error(tmp_path: Path) -> None:
    """A real `gateway serve` stopped by a provider's `pricing` the price database lacks: exit
    2 and one line naming the config file, then the field, as every other config error does
    (it named the field alone: which of several files was wrong, the line did not say)."""
    lines = {}
    for name, field in (("pricing", 'pricing = "nosuchco"'), ("base_url", 'base_url = "ftp://x"')):
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'[server]\ndatabase = "{tmp_path / "keys.db"}"\n\n'
            f'[[providers]]\nname = "o"\ntype = "openai"\n{field}\n'
        )
        proc = await start_serve(config, free_port())
        try:
            async with asyncio.timeout(NEVER_HANG):
                _, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 2, err
        lines[name] = err.decode()
    assert lines["pricing"] == (
        f"gateway: config error: {tmp_path / 'pricing.toml'}: providers.o.pricing: 'nosuchco'"
        " is not a provider of the price database (use one of its ids, 'free' or 'none')\n"
    )
    assert lines["base_url"].startswith(
        f"gateway: config error: {tmp_path / 'base_url.toml'}: providers[0].base_url: "
    )
