"""Loading the configuration: TOML, `env:NAME` secrets, checks, and the embedded default.

`load_settings()` is the only entry point. It reads the file (or builds the default from the
environment), resolves secrets, checks cross-references, and raises `ConfigError` with one line
naming the field and the problem, so a bad config stops the process before it binds a port.
"""

from __future__ import annotations

import os
import re
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import msgspec

from gateway.dburl import problem as database_problem
from gateway.schemas.codec import error_path
from gateway.settings import (
    DEFAULT_BASE_URLS,
    AnthropicConfig,
    AzureConfig,
    ConfigError,
    DemoConfig,
    GeminiConfig,
    ModelConfig,
    OpenAIConfig,
    ProviderConfig,
    Settings,
    Target,
    UpstreamConfig,
)

__all__ = [
    "DEMO_MODEL",
    "REASONING_MODELS",
    "config_file",
    "default_settings",
    "load_settings",
    "naming",
]

# Path endings that mean a base_url already holds what the gateway appends (a copy of the
# OpenAI-compatible URL, say), which would end in e.g. /v1/v1/messages.
_ROOT_ONLY = {
    "anthropic": ("/v1", "/v1/messages"),
    "gemini": ("/v1beta", "/v1beta/openai"),
    "azure": ("/openai", "/openai/v1", "/openai/deployments"),
}

# RFC 9110: a header name is a token; a value has no control characters (line breaks
# would start another header).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

PROVIDER_TYPES = tuple(str(t.__struct_config__.tag) for t in typing.get_args(ProviderConfig))

UpstreamT = TypeVar("UpstreamT", bound=UpstreamConfig)

# Models that take `reasoning_effort` (OpenAI: and reject `max_tokens`), per provider type;
# used by the embedded default config for "<provider>/<model>" ids.
REASONING_MODELS: dict[str, tuple[str, ...]] = {
    "openai": ("o1*", "o3*", "o4*", "gpt-5*"),
    "anthropic": ("claude-3-7-sonnet*", "claude-sonnet-4*", "claude-opus-4*", "claude-haiku-4*"),
    "gemini": ("gemini-2.5-pro*", "gemini-2.5-flash", "gemini-2.5-flash-*", "gemini-3*"),
}


def _redis_url_problem(url: str) -> str | None:
    """Why redis-py cannot take `url`, in words that never repeat it (its own error quotes a
    piece of it: a password's, where the password holds a `/`)."""
    from redis.connection import parse_url  # (not loaded by commands that never use Redis)

    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        return "not a valid Redis URL (e.g. redis://:password@127.0.0.1:6379/0)"
    return None


def _resolve_secret(value: str, where: str, environ: Mapping[str, str]) -> str:
    if not value.startswith("env:"):
        return value
    name = value[4:]
    found = environ.get(name)
    if not found:
        raise ConfigError(f"{where}: environment variable {name} is not set")
    return found


def _check_base_url(base_url: str, kind: str, where: str) -> None:
    """Refuse a provider's `base_url` that is not an http(s) API root without credentials, in
    words that never repeat it (a URL with a user part may hold a password).

    Raises:
        ConfigError: naming `where`.base_url.
    """
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.base_url: must start with http:// or https://")
    try:
        parts = urllib.parse.urlsplit(base_url)
        parts.port  # noqa: B018 - raises for a port that is not a number or out of range
    except ValueError:
        raise ConfigError(f"{where}.base_url: not a valid URL (its port)") from None
    if "@" in parts.netloc:
        # aiohttp refuses a URL's credentials beside an Authorization header: every request
        # would fail.
        raise ConfigError(
            f"{where}.base_url: must not hold a user or password (the gateway signs in "
            "with the provider's api_keys; other credentials go in its headers)"
        )
    if kind in _ROOT_ONLY and parts.path.rstrip("/").endswith(_ROOT_ONLY[kind]):
        root = DEFAULT_BASE_URLS[kind] or "https://RESOURCE.openai.azure.com"
        raise ConfigError(
            f"{where}.base_url: give the API root (as {kind}'s SDK takes it, e.g. "
            f"{root}); the gateway adds the rest of the path"
        )


def _upstream(p: UpstreamT, where: str, environ: Mapping[str, str]) -> UpstreamT:
    """Check an HTTP provider's fields and resolve its secrets."""
    if isinstance(p, AnthropicConfig | GeminiConfig | AzureConfig) and not p.api_keys:
        raise ConfigError(f"{where}.api_keys: {p.type} providers need at least one key")
    if isinstance(p, AzureConfig) and p.base_url is None:
        raise ConfigError(
            f"{where}.base_url: azure providers need their resource's endpoint "
            "(https://RESOURCE.openai.azure.com)"
        )
    for limit in ("max_response_bytes", "max_event_bytes"):
        if getattr(p, limit) > p.max_buffered_bytes:
            raise ConfigError(
                f"{where}.max_buffered_bytes: must be at least {limit} ({getattr(p, limit)}), "
                "or an answer that size could never be read"
            )
    if p.base_url is not None:
        _check_base_url(p.base_url, p.type, where)
    keys = tuple(
        _header_value(
            _resolve_secret(k, f"{where}.api_keys[{j}]", environ), f"{where}.api_keys[{j}]"
        )
        for j, k in enumerate(p.api_keys)
    )
    headers = {}
    for k, v in p.headers.items():
        if not _TOKEN.match(k):
            raise ConfigError(f"{where}.headers: {k!r} is not a valid header name")
        value = _resolve_secret(v, f"{where}.headers.{k}", environ)
        headers[k] = _header_value(value, f"{where}.headers.{k}")
    return msgspec.structs.replace(p, api_keys=keys, headers=headers)


def _header_value(value: str, where: str) -> str:
    """A value sent in a header (a key, or one of `headers`), checked before any request:
    aiohttp refuses a line break at request time, which would fail every request."""
    if _CONTROL.search(value):
        # Never the value itself: it is usually a secret.
        raise ConfigError(
            f"{where}: contains a control character, such as the line break a secret read "
            "from a file keeps; a header cannot carry it"
        )
    return value


def _with_demo(settings: Settings) -> Settings:
    """Every config gets the offline `demo` provider and model unless it defines its own."""
    if any(p.name == "demo" for p in settings.providers):
        return settings
    providers = (*settings.providers, DemoConfig(name="demo"))
    models = settings.models
    if not any(m.name == "demo" for m in models):
        models = (*models, DEMO_MODEL)
    return msgspec.structs.replace(settings, providers=providers, models=models)


def _resolve(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """Resolve `env:` secrets and check every cross-reference."""
    settings = _with_demo(settings)
    admin_key = settings.server.admin_key
    if admin_key is not None and admin_key.startswith("env:"):
        # An unset admin key variable turns the admin API off rather than refusing to start.
        admin_key = environ.get(admin_key[4:]) or None
    if admin_key is not None and len(admin_key) < 16:
        raise ConfigError("server.admin_key: must be at least 16 characters")
    # A PostgreSQL URL may hold a password: `database = "env:KIOSK_DATABASE_URL"`.
    database = _resolve_secret(settings.server.database, "server.database", environ)
    problem = database_problem(database)  # (its words never repeat the URL: a password)
    if problem is not None:
        raise ConfigError(f"server.database: {problem}")
    redis_url = settings.server.redis_url
    if redis_url is not None:
        redis_url = _resolve_secret(redis_url, "server.redis_url", environ)
        if not redis_url.lower().startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                "server.redis_url: must start with redis://, rediss:// or unix:// "
                "(e.g. redis://127.0.0.1:6379/0)"
            )
        problem = _redis_url_problem(redis_url)
        if problem is not None:
            raise ConfigError(f"server.redis_url: {problem}")
    server = msgspec.structs.replace(
        settings.server, admin_key=admin_key, database=database, redis_url=redis_url
    )

    providers: list[ProviderConfig] = []
    seen: set[str] = set()
    for i, p in enumerate(settings.providers):
        where = f"providers[{i}]"
        if p.name in seen:
            raise ConfigError(f"{where}.name: duplicate provider name {p.name!r}")
        seen.add(p.name)
        providers.append(_upstream(p, where, environ) if isinstance(p, UpstreamConfig) else p)

    names: set[str] = set()
    for i, m in enumerate(settings.models):
        where = f"models[{i}]"
        if m.name in names:
            raise ConfigError(f"{where}.name: duplicate model name {m.name!r}")
        names.add(m.name)
        for j, t in enumerate(m.targets):
            if t.provider not in seen:
                raise ConfigError(
                    f"{where}.targets[{j}].provider: no provider named {t.provider!r}"
                )
    groups: set[str] = set()
    for i, g in enumerate(settings.groups):
        if g.name in groups:
            raise ConfigError(f"groups[{i}].name: duplicate group name {g.name!r}")
        groups.add(g.name)
    resolved = msgspec.structs.replace(settings, server=server, providers=tuple(providers))
    default = server.default_model
    if default and resolved.model(default) is None:
        prefix = default.split("/", 1)[0]
        if "/" not in default or prefix not in seen:
            raise ConfigError(f"server.default_model: no model named {default!r}")
    return resolved


def _describe(err: msgspec.MsgspecError) -> str:
    """msgspec says "Expected `int`, got `str` - at `$.server.port`"; put the path first.

    A missing or unknown field is named by its own path (`providers[0].responses_api`, not
    its parent's), and an unknown provider type lists the known ones.
    """
    text = str(err)
    problem, at, param = error_path(text)
    if at is None:
        return text
    named = param if param and at.replace("[...]", "") != param else at
    if named.startswith("providers[") and named.endswith("].type") and "Invalid value" in problem:
        problem += f" (the provider types are: {', '.join(PROVIDER_TYPES)})"
    return f"{named}: {problem}"


DEMO_MODEL = ModelConfig(
    name="demo",
    targets=(Target(provider="demo", model="demo"),),
    description="Offline demo model: answers from your last message, and embeds text.",
    embeddings=True,
)


def default_settings(environ: Mapping[str, str]) -> Settings:
    """The embedded default: the offline demo model, plus one provider per API key found."""
    providers: list[ProviderConfig] = []
    models: list[ModelConfig] = []
    if environ.get("OPENAI_API_KEY"):
        providers.append(
            OpenAIConfig(
                name="openai",
                base_url=environ.get("OPENAI_BASE_URL") or None,
                api_keys=("env:OPENAI_API_KEY",),
                reasoning_models=REASONING_MODELS["openai"],
            )
        )
        models.append(
            ModelConfig(
                name="gpt-4o-mini",
                targets=(Target(provider="openai", model="gpt-4o-mini"),),
                input_price_per_mtok=0.15,
                output_price_per_mtok=0.60,
            )
        )
    native: tuple[tuple[str, str, type[AnthropicConfig | GeminiConfig]], ...] = (
        ("ANTHROPIC_API_KEY", "anthropic", AnthropicConfig),
        ("GEMINI_API_KEY", "gemini", GeminiConfig),
    )
    for var, name, kind in native:
        if environ.get(var):
            providers.append(
                kind(
                    name=name,
                    api_keys=(f"env:{var}",),
                    reasoning_models=REASONING_MODELS[name],
                )
            )
    return _resolve(Settings(providers=tuple(providers), models=tuple(models)), environ)


def config_file(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> str | None:
    """The file `load_settings(path, environ)` reads: `path`, `$GATEWAY_CONFIG` or
    `./gateway.toml`; None for the embedded default. What a config error names first."""
    if path is None:
        path = environ.get("GATEWAY_CONFIG") or None
    if path is None and Path("gateway.toml").is_file():
        path = "gateway.toml"
    return None if path is None else str(path)


def naming(where: str | None, exc: ConfigError) -> ConfigError:
    """`exc` with the config file it was found in named first, as `load_settings` names its
    errors (the embedded default, None: as it is)."""
    return exc if where is None else ConfigError(f"{where}: {exc}")


def load_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Settings:
    """Load settings from `path`, `$GATEWAY_CONFIG`, `./gateway.toml` or the embedded default.

    Raises:
        ConfigError: the file is missing, is not TOML, or has a bad field (one line says which).
    """
    where = config_file(path, environ)
    if where is None:
        return default_settings(environ)
    try:
        raw = Path(where).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read config file ({exc.strerror})") from None
    try:
        settings = msgspec.toml.decode(raw, type=Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not valid UTF-8") from None
    try:
        return _resolve(settings, environ)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
