"""Config loading: the embedded default, TOML files, env secrets, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from gateway.config import load_settings
from gateway.prices import PriceBook, Usage
from gateway.settings import ConfigError, DemoConfig, ModelConfig, Target

GOOD = """
[server]
port = 9000
admin_key = "env:ADMIN"
default_model = "gpt"

[[providers]]
name = "openai"
type = "openai"
api_keys = ["env:OPENAI_API_KEY", "literal-key"]

[[models]]
name = "gpt"
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
input_price_per_mtok = 0.15
output_price_per_mtok = 0.6
max_tokens = 256
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_default_is_demo_only_without_env() -> None:
    settings = load_settings(None, {})
    assert [p.name for p in settings.providers] == ["demo"]
    assert [m.name for m in settings.models] == ["demo"]
    assert settings.server.port == 8080 and settings.server.admin_key is None


def test_default_adds_providers_from_env() -> None:
    settings = load_settings(
        None, {"OPENAI_API_KEY": "sk-a", "ANTHROPIC_API_KEY": "sk-b", "GEMINI_API_KEY": "g"}
    )
    names = {p.name: p for p in settings.providers}
    assert set(names) == {"demo", "openai", "anthropic", "gemini"}
    assert names["openai"].api_keys == ("sk-a",)
    assert names["openai"].url == "https://api.openai.com/v1"
    assert names["anthropic"].type == "anthropic"
    assert names["anthropic"].url == "https://api.anthropic.com"
    assert names["gemini"].type == "gemini"
    assert names["gemini"].url == "https://generativelanguage.googleapis.com"
    assert names["anthropic"].reasoning_models  # claude-sonnet-4* etc. take reasoning_effort
    assert settings.model("gpt-4o-mini") is not None


def test_file_with_env_secrets(tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "sk-real", "ADMIN": "a" * 20}
    settings = load_settings(write(tmp_path, GOOD), env)
    assert settings.server.port == 9000
    assert settings.server.admin_key == "a" * 20
    assert settings.providers[0].api_keys == ("sk-real", "literal-key")
    model = settings.model("gpt")
    assert model is not None and model.max_tokens == 256
    price = PriceBook().price(model, settings.providers[0], "gpt-4o-mini")
    assert price is not None and price.cost(Usage(1_000_000, 1_000_000)) == pytest.approx(0.75)


def test_gateway_config_env_var_and_cwd_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    env = {"GATEWAY_CONFIG": str(path), "OPENAI_API_KEY": "k"}
    assert load_settings(None, env).server.port == 9000
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, {"OPENAI_API_KEY": "k"}).server.port == 9000


def test_unset_admin_env_turns_admin_off(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), {"OPENAI_API_KEY": "k"})
    assert settings.server.admin_key is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 'x'\n", "server.port: Expected `int`, got `str`"),
        ("[server]\nbogus = 1\n", "server.bogus: Object contains unknown field `bogus`"),
        ("[server\n", "not valid TOML"),
        (
            "[[providers]]\nname = 'p'\ntype = 'nope'\n",
            "providers[0].type: Invalid value 'nope' "
            "(the provider types are: openai, azure, anthropic, gemini, demo)",
        ),
        (
            "[[providers]]\nname = 'p'\ntype = 'openai'\napi_keys = ['env:MISSING']\n",
            "providers[0].api_keys[0]: environment variable MISSING is not set",
        ),
        (
            "[[models]]\nname = 'm'\ntargets = [{provider = 'ghost', model = 'x'}]\n",
            "models[0].targets[0].provider: no provider named 'ghost'",
        ),
        (
            "[[models]]\nname = 'm'\ntargets = []\n",
            "models[0].targets: Expected `array` of length >= 1",
        ),
        ("[server]\ndefault_model = 'ghost'\n", "server.default_model: no model named 'ghost'"),
        (
            "[[providers]]\nname = 'a'\ntype = 'anthropic'\n",
            "providers[0].api_keys: anthropic providers need at least one key",
        ),
        ("[server]\nadmin_key = 'short'\n", "server.admin_key: must be at least 16 characters"),
        (
            "[[providers]]\nname = 'p'\ntype = 'openai'\nmax_buffered_bytes = 1000\n",
            "providers[0].max_buffered_bytes: must be at least max_response_bytes (67108864)",
        ),
        (
            "[[providers]]\nname = 'a'\ntype = 'anthropic'\napi_keys = ['k']\n"
            "base_url = 'https://api.anthropic.com/v1'\n",
            "providers[0].base_url: give the API root",
        ),
        (
            "[[providers]]\nname = 'g'\ntype = 'gemini'\napi_keys = ['k']\n"
            "base_url = 'https://generativelanguage.googleapis.com/v1beta/openai/'\n",
            "providers[0].base_url: give the API root",
        ),
        (
            "[server]\nredis_url = 'http://127.0.0.1:6379'\n",
            "server.redis_url: must start with redis://, rediss:// or unix://",
        ),
        ("[server]\nredis_url = 'env:NO_SUCH_VAR'\n", "server.redis_url: environment variable"),
        ("[server]\nredis_failure = 'ignore'\n", "redis_failure"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), {})
    rendered = str(info.value)
    assert "\n" not in rendered
    assert rendered.startswith(str(tmp_path / "gateway.toml") + ": ")
    assert message in rendered


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.toml", {})


CONFIG_DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_the_documented_config_example_loads(tmp_path: Path) -> None:
    # The full example of docs/configuration.md (its first toml block); tests/test_docs.py
    # loads every other toml block of the docs as well.
    text = CONFIG_DOC.read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    env = {"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-a", "GEMINI_API_KEY": "g"}
    settings = load_settings(write(tmp_path, block), env)
    names = {p.name: p for p in settings.providers}
    assert set(names) == {"openai", "anthropic", "gemini", "local", "demo"}
    assert names["anthropic"].default_max_tokens == 4096
    assert names["gemini"].url == "https://generativelanguage.googleapis.com"
    assert settings.server.default_model == "demo"  # the built-in demo model is always there
    assert settings.model("demo") is not None and settings.model("gpt-4o-mini") is not None


def test_a_config_with_its_own_demo_provider_is_left_alone(tmp_path: Path) -> None:
    text = "[[providers]]\nname = 'demo'\ntype = 'openai'\nbase_url = 'http://127.0.0.1:1/v1'\n"
    text += "[server]\ndefault_model = 'demo/x'\n"
    settings = load_settings(write(tmp_path, text), {})
    assert [p.type for p in settings.providers] == ["openai"]
    assert settings.model("demo") is None


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("api_keys = ['env:KEY']", "sk-secret-from-a-file\n", "providers[0].api_keys[0]"),
        ("api_keys = ['env:KEY']", "sk-secret\r\nX-Injected: 1", "providers[0].api_keys[0]"),
        ("headers = { X-Org = 'env:KEY' }", "org-1\r\nX-Injected: 1", "providers[0].headers.X-Org"),
        ("headers = { X-Org = 'env:KEY' }", "org\x001", "providers[0].headers.X-Org"),
    ],
)
def test_a_secret_a_header_cannot_carry_is_refused_at_start(
    tmp_path: Path, field: str, value: str, where: str
) -> None:
    # A key read into the environment with its file's newline (KEY=$(cat key.txt) keeps
    # none, but --env-file and many secret stores do) made every request fail with an
    # unhandled 500: aiohttp refuses to send a header with a line break, at request time.
    text = f"[[providers]]\nname = 'p'\ntype = 'openai'\n{field}\n"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), {"KEY": value})
    rendered = str(info.value)
    assert f"{where}: contains a control character" in rendered
    assert value.split("\n")[0].split("\x00")[0].strip() not in rendered  # no secret shown


@pytest.mark.parametrize("name", ["X Org", "X-Org:", "X-Org\r\nX-Injected", ""])
def test_a_header_name_that_is_no_token_is_refused(tmp_path: Path, name: str) -> None:
    text = f"[[providers]]\nname = 'p'\ntype = 'openai'\nheaders = {{ {json.dumps(name)} = 'v' }}\n"
    with pytest.raises(
        ConfigError, match=r"providers\[0\]\.headers: .* is not a valid header name"
    ):
        load_settings(write(tmp_path, text), {})


def cost(model: ModelConfig, prompt: int, completion: int, read: int = 0, write: int = 0) -> float:
    price = PriceBook().price(model, DemoConfig(name="p"), "m")  # config prices: no lookup
    assert price is not None
    return price.cost(Usage(prompt, completion, cached=read, cache_write=write))


def test_cache_tokens_are_priced_apart() -> None:
    target = (Target(provider="p", model="m"),)
    plain = ModelConfig(
        name="a", targets=target, input_price_per_mtok=2.0, output_price_per_mtok=8.0
    )
    assert cost(plain, 100, 10, 60, 20) == cost(plain, 100, 10)  # unset: the input price
    cached = msgspec.structs.replace(
        plain, cache_read_price_per_mtok=0.2, cache_write_price_per_mtok=2.5
    )
    assert cost(cached, 100, 10, 60, 20) == pytest.approx((20 * 2 + 60 * 0.2 + 20 * 2.5 + 80) / 1e6)
    assert cost(cached, 10, 0, 60, 20) == pytest.approx((60 * 0.2 + 20 * 2.5) / 1e6)
