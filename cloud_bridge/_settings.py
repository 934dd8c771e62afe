"""The bridge's settings model: one tree feeds the TOML config file, ``CLOUD_BRIDGE_*`` env and flags.

The model aliases are tables under ``[models.<alias>]``; each names its
``backend`` and is parsed with that backend's settings class (the same
machinery, so unknown keys and bad values name the dotted field). Example::

    [server]
    address = "0.0.0.0:50051"
    tls_cert = "server.crt"
    tls_key = "server.key"
    client_ca = "devices-ca.crt"      # set it to require client certificates (mTLS)

    [auth]
    tokens_file = "bridge-tokens.toml"  # written by `cloud-bridge token add DEVICE`

    [quota]
    requests_per_minute = 60
    tokens_per_minute = 50000

    [models.coder]
    backend = "onnx"
    bundle = "/var/lib/cloud-bridge/qwen2.5-coder-0.5b"
    workers = 1
    queue_size = 8

    [models.gpt]
    backend = "openai"
    base_url = "https://api.example.com/v1"
    model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"
    usd_per_million_input_tokens = 0.15
    usd_per_million_output_tokens = 0.60

Relative paths are relative to the config file's directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.cloud import check_address
from edge_runtime.config import check_threads, documented, load_settings, setting, shown
from edge_runtime.engine.types import MAX_NEW_TOKENS_LIMIT
from edge_runtime.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "ENV_PREFIX",
    "ServerSettings",
    "AuthSettings",
    "QuotaSettings",
    "LimitsSettings",
    "ModelSettings",
    "OnnxModelSettings",
    "OpenAIModelSettings",
    "EchoModelSettings",
    "MODEL_SETTINGS",
    "BridgeSettings",
    "load_bridge_settings",
]

ENV_PREFIX = "CLOUD_BRIDGE"
# an openai model's token cap field; the fields of a device's request its upstream may be told nothing of
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
OMITTABLE_PARAMS = ("temperature", "top_p", "seed", "top_k")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def _as_paths(settings: Any, names: tuple[str, ...], section: str) -> None:
    """Make the path fields of a settings object Paths: code that builds settings may pass str or os.PathLike."""
    for name in names:
        value = getattr(settings, name)
        if value is None or isinstance(value, Path):
            continue
        try:
            object.__setattr__(settings, name, Path(value))
        except TypeError as err:
            raise ConfigError(f"expected a path, got {value!r}", field=f"{section}{name}") from err


@documented
@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The bridge's listener (``[server]``; ``CLOUD_BRIDGE_SERVER_*``)."""

    address: str = setting("127.0.0.1:50051", path="unix", help="host:port to listen on (port 0 picks a free one)")
    tls_cert: Path | None = setting(None, help="PEM certificate chain of the server")
    tls_key: Path | None = setting(None, help="PEM private key of the server")
    client_ca: Path | None = setting(
        None, help="PEM CA bundle for device certificates; when set, clients must present one (mTLS)"
    )
    max_message_bytes: int = setting(4 << 20, help="largest request or response message, in bytes")
    max_concurrent_rpcs: int = setting(64, help="generation calls in progress beyond which the bridge answers "
                                               "RESOURCE_EXHAUSTED (health checks and ListModels are not counted)")
    grace_period_s: float = setting(10.0, help="on shutdown, how long in-flight calls may take to finish")
    shutdown_delay_s: float = setting(
        0.0, help="on shutdown, how long to keep serving with health NOT_SERVING before refusing new calls, so a "
                  "load balancer that polls the health check sees it and sends calls elsewhere first")
    log_content: bool = setting(False, help="log prompts and answers (off by default: they are the users' data)")

    def __post_init__(self) -> None:
        _as_paths(self, ("tls_cert", "tls_key", "client_ca"), "server.")

    def validate(self) -> None:
        check_address(self.address, field="server.address", min_port=0)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be given together", field="server.tls_cert")
        if self.client_ca is not None and self.tls_cert is None:
            raise ConfigError("client certificates (mTLS) need TLS: set tls_cert and tls_key", field="server.client_ca")
        if not 1024 <= self.max_message_bytes <= 2**31 - 1:  # gRPC's limits are signed 32-bit
            raise ConfigError(f"must be from 1024 to {2**31 - 1}, got {self.max_message_bytes}",
                              field="server.max_message_bytes")
        if self.max_concurrent_rpcs < 1:
            raise ConfigError(f"must be at least 1, got {self.max_concurrent_rpcs}", field="server.max_concurrent_rpcs")
        for name in ("grace_period_s", "shutdown_delay_s"):
            value = getattr(self, name)
            if not 0 <= value <= 3600:  # also refuses nan
                raise ConfigError(f"must be from 0 to 3600 s, got {value}", field=f"server.{name}")


@documented
@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """Device tokens (``[auth]``)."""

    tokens_file: Path | None = setting(
        Path("bridge-tokens.toml"), help="TOML file of device token hashes, managed by `cloud-bridge token add/remove`"
    )
    tokens: dict[str, str] = setting(
        factory=dict, help='inline device = "sha256:<hex>" token hashes (in addition to tokens_file)', secret=True,
        private=False,  # hashes, not tokens: a bridge.toml readable by others gives no device away
    )
    reload_interval_s: float = setting(
        1.0, help="how often to look for changes to tokens_file (added and revoked tokens apply without a restart)"
    )

    def __post_init__(self) -> None:
        _as_paths(self, ("tokens_file",), "auth.")

    def validate(self) -> None:
        # a huge interval would keep a revoked token working until a restart; nan would never compare
        if not 0 <= self.reload_interval_s <= 3600:  # 0: look at every call
            raise ConfigError(f"must be from 0 to 3600 s, got {self.reload_interval_s!r}", field="auth.reload_interval_s")
        # checked here, not first when serving: `cloud-bridge config` said nothing of a token written in clear, which
        # `serve` then refused (neither echoes it)
        from ._auth import check_inline_tokens

        check_inline_tokens(self.tokens)


@documented
@dataclass(frozen=True, kw_only=True)
class QuotaSettings:
    """Per-device rate limits (``[quota]``)."""

    requests_per_minute: float = setting(60.0, help="per device; 0 disables the request quota")
    requests_burst: int | None = setting(None, help="requests a device may make at once (default: requests_per_minute)")
    tokens_per_minute: float = setting(
        100_000.0, help="prompt + completion tokens per device; 0 disables the token quota"
    )
    tokens_burst: int | None = setting(None, help="tokens a device may use at once (default: tokens_per_minute)")

    def validate(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            if not getattr(self, name) >= 0:  # nan would turn the quota off (nan > 0 is false)
                raise ConfigError(f"must be >= 0, got {getattr(self, name)!r}", field=f"quota.{name}")
        for name in ("requests_burst", "tokens_burst"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError("must be at least 1", field=f"quota.{name}")


@documented
@dataclass(frozen=True, kw_only=True)
class LimitsSettings:
    """Per-request limits (``[limits]``)."""

    default_model: str = setting("", help="alias used when a request names none (default: the first alias)")
    max_new_tokens: int = setting(2048, help="largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = setting(
        256, help="max_new_tokens when a request leaves it unset (never more than the cap that applies; an onnx or "
                  "echo model cuts it to what the prompt leaves of its window)")
    max_messages: int = setting(64, help="most chat messages in one request")
    max_prompt_chars: int = setting(64_000, help="most characters over all message contents of one request, plus its escalation context (reason, policy, "
                                                 "local model, and the draft, which is left out when only it does not fit)")

    def validate(self) -> None:
        for name in ("max_new_tokens", "default_max_new_tokens", "max_messages", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=f"limits.{name}")
        # a request's max_new_tokens is refused above this anyway (SamplingParams): advertising more would mislead,
        # and a config that asked for more before still starts
        if self.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
            log.warning("limits.max_new_tokens %d is above what a request may ask for; %d applies",
                        self.max_new_tokens, MAX_NEW_TOKENS_LIMIT)
            object.__setattr__(self, "max_new_tokens", MAX_NEW_TOKENS_LIMIT)
        # a default above max_new_tokens is cut to it where it is used (as to a model's own cap): lowering the
        # cap alone, `--limits-max-new-tokens 100`, must not need the default lowered too


@documented
@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """What every model alias has, whatever its backend."""

    backend: str = setting("", help="onnx | openai | echo")
    workers: int = setting(1, help="generations run at once for this alias")
    queue_size: int = setting(
        8, help="requests that may wait for a worker; beyond it the bridge answers RESOURCE_EXHAUSTED"
    )
    max_new_tokens: int | None = setting(None, help="cap for this alias below limits.max_new_tokens")
    usd_per_million_input_tokens: float = setting(0.0, help="price of prompt tokens, USD per million")
    usd_per_million_output_tokens: float = setting(0.0, help="price of completion tokens, USD per million")
    escalation_hint: bool = setting(False, help="show the device's draft answer to the model as a system note")

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError("must be at least 1", field="workers")
        if self.queue_size < 0:
            raise ConfigError("must be >= 0", field="queue_size")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError("must be at least 1", field="max_new_tokens")
        for name in ("usd_per_million_input_tokens", "usd_per_million_output_tokens"):
            if not 0 <= getattr(self, name) < float("inf"):  # nan or inf would be billed as such
                raise ConfigError(f"prices must be finite and >= 0, got {getattr(self, name)!r}", field=name)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.usd_per_million_input_tokens + completion_tokens * self.usd_per_million_output_tokens
        ) / 1e6


@documented
@dataclass(frozen=True, kw_only=True)
class OnnxModelSettings(ModelSettings):
    """A ``[models.<alias>]`` table with ``backend = "onnx"``: a model bundle run by this project's engine."""

    backend: str = setting("onnx", help="onnx: run a model bundle with this project's engine")
    bundle: Path | None = setting(None, help="model bundle directory")
    intra_op_threads: int | None = setting(
        None, help="onnxruntime threads per generation (default: the engine's choice)"
    )

    def __post_init__(self) -> None:
        _as_paths(self, ("bundle",), "")

    def validate(self) -> None:
        super().validate()
        if self.bundle is None:
            raise ConfigError("an onnx model needs a bundle directory", field="bundle")
        check_threads(self.intra_op_threads, field="intra_op_threads")  # _parse_model adds models.<alias>.


def hide_query(url: str) -> str:
    """``url`` with its query's values shown as ``***``: a query may hold a key (Google's ?key=...). ValueError for
    a URL urllib cannot split (a bad bracket)."""
    parts = urllib.parse.urlsplit(url)
    hidden = "&".join(f"{name}=***" for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit(parts._replace(query=hidden))


@documented
@dataclass(frozen=True, kw_only=True)
class OpenAIModelSettings(ModelSettings):
    """A ``[models.<alias>]`` table with ``backend = "openai"``: an OpenAI-compatible HTTP endpoint."""

    backend: str = setting(
        "openai", help="openai: any OpenAI-compatible HTTP endpoint (vLLM, llama.cpp, Ollama, hosted APIs)"
    )
    base_url: str = setting(
        "", help="endpoint root, e.g. https://api.example.com/v1 (POST {base_url}/chat/completions)"
    )
    model: str = setting("", help="the endpoint's model name")
    api_key_env: str | None = setting(
        None, help="environment variable holding the API key (the key itself never goes in the file)"
    )
    timeout_s: float = setting(
        120.0, help="longest an upstream call may take (the device's deadline may cut it shorter)"
    )
    connect_timeout_s: float = setting(10.0, help="longest wait for the upstream connection")
    max_tokens_field: str = setting(
        "max_tokens", help="the request field that carries the token cap: max_tokens (vLLM, llama.cpp, Ollama, most "
        "hosted models) or max_completion_tokens (OpenAI's reasoning models, which refuse max_tokens)"
    )
    omit_params: list[str] = setting(
        factory=list, help="sampling fields never sent upstream, any of " + ", ".join(OMITTABLE_PARAMS)
        + ": for models that refuse them (OpenAI's reasoning models take no temperature or top_p); the upstream's "
        "own defaults apply instead"
    )
    workers: int = setting(8, help="upstream calls at once for this alias")
    queue_size: int = setting(32, help="requests that may wait for a worker")

    def validate(self) -> None:
        super().validate()
        if "@" in self.base_url:
            # A user name or password is never sent (the key goes in a header), and `cloud-bridge config` shows
            # base_url: refused first. Anywhere in the URL: a password with a "/" in it ends the URL's authority
            # early, and "https://user:12345/pw@host" parses as host "user", port 12345. An API path has no "@"
            # (percent-encode one as %40). No message here echoes base_url, which may hold a secret all the same.
            raise ConfigError("holds '@' (a user name or password?), which is never sent; put the API key in the "
                              "environment variable that api_key_env names", field="base_url")
        if not re.match(r"^https?://[^/]+", self.base_url):
            raise ConfigError("must be an http:// or https:// URL", field="base_url")
        try:  # a bad port or bracket fails here, not as a traceback when the backend is built
            url = urllib.parse.urlsplit(self.base_url)
            url.port  # noqa: B018  (reading it validates it)
        except ValueError as err:  # its text quotes the URL's pieces
            raise ConfigError("is not a usable URL (a bad port or bracket)", field="base_url") from err
        if not url.hostname:
            raise ConfigError("names no host", field="base_url")
        if url.fragment:
            raise ConfigError("has a #fragment, which is never sent", field="base_url")
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # a key typed here was shown by `cloud-bridge config` and in "environment variable sk-... is not set";
            # not quoted here either
            raise ConfigError("must name an environment variable (letters, digits and _), not hold the key itself; "
                              "the value is not shown", field="api_key_env")
        if not self.model:
            raise ConfigError("the endpoint's model name is required", field="model")
        for name in ("timeout_s", "connect_timeout_s"):
            if not 0 < getattr(self, name) <= 86_400:  # also refuses nan
                raise ConfigError(f"must be > 0 and at most 86400 s, got {getattr(self, name)!r}", field=name)
        if self.max_tokens_field not in MAX_TOKENS_FIELDS:
            raise ConfigError(f"must be one of {', '.join(MAX_TOKENS_FIELDS)}, got {shown(self.max_tokens_field)}",
                              field="max_tokens_field")
        for name in self.omit_params:
            # stop is not among them: an upstream that ignored it would return text past the device's stop string
            if name not in OMITTABLE_PARAMS:
                raise ConfigError(f"{shown(name)} is not a field that may be left out (any of "
                                  f"{', '.join(OMITTABLE_PARAMS)})", field="omit_params")

    def __repr__(self) -> str:
        # base_url's query may hold a key (Google's ?key=...): its values are hidden, as `cloud-bridge config` hides
        # them; a repr reaches debug logs and tracebacks that show locals
        values = {f.name: repr(getattr(self, f.name)) for f in dataclasses.fields(self) if f.repr}
        try:
            values["base_url"] = repr(hide_query(self.base_url))
        except ValueError:  # nothing of it is shown
            values["base_url"] = "'<not a URL>'"
        fields = ", ".join(f"{name}={value}" for name, value in values.items())
        return f"{type(self).__name__}({fields})"

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        if not self.api_key_env:
            return None
        env = os.environ if environ is None else environ
        key = env.get(self.api_key_env)
        if not key:
            raise ConfigError(f"environment variable {self.api_key_env} is not set", field="api_key_env")
        # a key read from an env file or a mounted secret often ends in a newline: http.client would refuse the
        # header on every call, with the whole key in the error it raises
        key = key.strip()
        if not key or any(ord(c) < 0x21 or ord(c) == 0x7F for c in key):
            raise ConfigError(f"environment variable {self.api_key_env} holds spaces or control characters inside "
                              "the key (or nothing but them)", field="api_key_env")
        return key


@documented
@dataclass(frozen=True, kw_only=True)
class EchoModelSettings(ModelSettings):
    """A model-free backend for tests, demos and benchmarks: it answers with fixed or echoed words."""

    backend: str = setting("echo", help="echo: answers with `reply` (or the last user message), one word per token")
    model: str = setting("echo", help="name the backend reports as the answering model")
    reply: str = setting("", help="fixed answer; empty echoes the last user message")
    token_delay_ms: float = setting(0.0, help="pause before each generated token, to imitate a real model")
    context_length: int = setting(4096, help="prompt + completion words the backend accepts")

    def validate(self) -> None:
        super().validate()
        if self.token_delay_ms < 0:
            raise ConfigError("must be >= 0", field="token_delay_ms")


# backend name -> its settings class
MODEL_SETTINGS: dict[str, type[ModelSettings]] = {
    "onnx": OnnxModelSettings,
    "openai": OpenAIModelSettings,
    "echo": EchoModelSettings,
}


def _parse_model(alias: str, table: Any) -> ModelSettings:
    where = f"models.{alias}"
    if isinstance(table, ModelSettings):
        return table
    if not _ALIAS_RE.match(alias):
        raise ConfigError("alias must be 1-64 letters, digits or ._:-", field=where)
    if not isinstance(table, Mapping):
        raise ConfigError("expected a table", field=where)
    backend = table.get("backend")
    cls = MODEL_SETTINGS.get(backend) if isinstance(backend, str) else None
    if cls is None:
        raise ConfigError(f"unknown backend {backend!r} (known: {', '.join(MODEL_SETTINGS)})", field=f"{where}.backend")
    try:
        return load_settings(cls, data=table, env={})
    except ConfigError as err:
        raise ConfigError(str(err).split(": ", 1)[-1], field=f"{where}.{err.field}" if err.field else where) from err


@documented
@dataclass(frozen=True, kw_only=True)
class BridgeSettings:
    """Everything ``cloud-bridge serve`` reads: one section per table of its config file."""

    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    auth: AuthSettings = dataclasses.field(default_factory=AuthSettings)
    quota: QuotaSettings = dataclasses.field(default_factory=QuotaSettings)
    limits: LimitsSettings = dataclasses.field(default_factory=LimitsSettings)
    models: dict[str, Any] = setting(factory=dict, help="model aliases: [models.<alias>] tables, each with a backend")

    def __post_init__(self) -> None:
        # tables from the file become typed settings here, so every BridgeSettings holds parsed models
        object.__setattr__(self, "models", {alias: _parse_model(alias, table) for alias, table in self.models.items()})

    def validate(self) -> None:
        self.server.validate()
        self.auth.validate()
        self.quota.validate()
        self.limits.validate()
        if self.limits.default_model and self.limits.default_model not in self.models:
            raise ConfigError(
                f"no such model alias (have: {', '.join(self.models) or 'none'})", field="limits.default_model"
            )

    @property
    def default_model(self) -> str:
        if self.limits.default_model:
            return self.limits.default_model
        return next(iter(self.models), "")


def _resolve(path: Path | None, base: Path, default: Path | None = None) -> Path | None:
    """A relative path: the default follows the config file's directory; one from the environment or a flag the
    working directory, as the daemon's do (a value from the file is already absolute: ``load_settings``)."""
    if path is None or path.is_absolute():
        return path
    return (base if path == default else Path.cwd()) / path


def load_bridge_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> BridgeSettings:
    """Load the bridge settings (the one place the config file is read); relative paths follow the file."""
    settings = load_settings(
        BridgeSettings, config_file=config_file, data=data, env=env, env_prefix=ENV_PREFIX, overrides=overrides
    )
    base = Path(config_file).resolve().parent if config_file is not None else Path.cwd()
    environ = os.environ if env is None else env
    server = dataclasses.replace(
        settings.server,
        tls_cert=_resolve(settings.server.tls_cert, base),
        tls_key=_resolve(settings.server.tls_key, base),
        client_ca=_resolve(settings.server.client_ca, base),
    )
    # the default follows the file; the same name given in the environment or a flag is the working directory's
    given = f"{ENV_PREFIX}_AUTH_TOKENS_FILE" in environ \
        or "tokens_file" in ((overrides or {}).get("auth") or {})
    default_tokens = None if given else next(f.default for f in dataclasses.fields(AuthSettings) if f.name == "tokens_file")
    auth = dataclasses.replace(settings.auth, tokens_file=_resolve(settings.auth.tokens_file, base, default_tokens))
    # [models.*] are free-form tables that load_settings leaves as written: their bundles follow the file, or the
    # working directory when the table came from the environment or a flag (which replace it whole)
    models_given = f"{ENV_PREFIX}_MODELS" in environ or "models" in (overrides or {})
    models_base = Path.cwd() if models_given else base
    models = {
        alias: dataclasses.replace(m, bundle=m.bundle if m.bundle is None or m.bundle.is_absolute() else models_base / m.bundle)
        if isinstance(m, OnnxModelSettings) else m
        for alias, m in settings.models.items()
    }
    return dataclasses.replace(settings, server=server, auth=auth, models=models)
