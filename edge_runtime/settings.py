"""The one settings model of the runtime and its daemon.

It feeds the TOML config file, the environment (``EDGE_RUNTIME_<SECTION>_<FIELD>``)
and the CLI flags (``--section-field``), through :mod:`edge_runtime.config`; the
file is read in exactly one place, :func:`load_runtime_settings`. Example::

    [engine]
    bundle = "smollm2-135m-instruct"       # a directory, or a cached bundle name
    estimator = "estimator.json"           # from `edge-runtime calibrate`

    [policy]                               # see edge_runtime.policies
    chain = [{type = "privacy"}, {type = "threshold", p = 0.6}]

    [cloud]
    address = "bridge.example.com:50051"
    token_file = "/etc/edge-runtime/token"  # chmod 600
    ca_file = "/etc/edge-runtime/bridge-ca.pem"

    [power]
    profile = "raspberry-pi-5"

    [cost]
    network = "cellular"

    [server]
    port = 8080
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cloud import CloudSettings
from .config import THREADS_HELP, check_threads, documented, load_settings, setting
from .cost import CostSettings
from .engine import MAX_PROMPT_LOOKUP_TOKENS, PROMPT_LOOKUP_TOKENS, SUGGESTED_PROMPT_LOOKUP_TOKENS
from .engine.types import ProviderSpec, provider_specs
from .errors import ConfigError
from .power import PowerSettings

__all__ = ["EngineSettings", "ServerSettings", "RuntimeSettings", "load_runtime_settings", "default_socket_path"]


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/edge-runtime.sock``, else in the cache directory (``EDGE_RUNTIME_CACHE`` moves it too)."""
    from .cache import cache_dir

    base = os.environ.get("XDG_RUNTIME_DIR")
    return (Path(base) if base else cache_dir(create=False)) / "edge-runtime.sock"


# a cached bundle's precision suffix: the precision, then a variant's own (quantize's -offsets, -mlp64, ...)
_PRECISION = re.compile(r"(fp32|int8|int4)(-[a-z0-9]+)*")


@documented
@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """The edge model and how it runs (``[engine]``; ``EDGE_RUNTIME_ENGINE_*``, flags of ``serve``)."""

    bundle: str = setting("smollm2-135m-instruct", path="if_exists",
                          help="edge bundle: a directory, or a cached bundle / known model name")
    precision: str = setting("int4", help="precision of the cached bundle when `bundle` is a known model name: fp32, "
                                          "int8, int4, or a variant quantize built (int4-offsets, int4-mlp64, ...)")
    estimator: Path | None = setting(None, help="confidence estimator JSON from `edge-runtime calibrate` or `explore` (default: the built-in `generic`)")
    threads: int | None = setting(None, help=THREADS_HELP)
    providers: list[str] = setting(factory=list, help="onnxruntime execution providers in order (default: CPU)")
    provider_options: dict[str, Any] = setting(
        factory=dict, help="options per provider in `providers`, e.g. {XnnpackExecutionProvider = {intra_op_num_threads = 2}}"
    )
    max_sessions: int = setting(1, help="local generations that may run at once (each holds a KV cache)")
    cache_tokens: int = setting(1024, help="KV-cache places each pooled cache keeps between requests (a longer "
                                                   "request grows it while it runs)")
    max_new_tokens: int = setting(256, help="default max_new_tokens when a request does not set one")
    prompt_lookup: int = setting(PROMPT_LOOKUP_TOKENS, help="tokens drafted per step from earlier text and checked in the "
                                 f"same run, sampled requests too (0: off; {SUGGESTED_PROMPT_LOOKUP_TOKENS} is a good value; "
                                 f"at most {MAX_PROMPT_LOOKUP_TOKENS})")

    def __post_init__(self) -> None:
        if not self.bundle.strip():  # else the working directory
            raise ConfigError("must name a bundle directory or a model", field="engine.bundle")
        if not _PRECISION.fullmatch(self.precision):
            raise ConfigError(f"must be fp32, int8 or int4, or a built variant such as int4-offsets; got {self.precision!r}",
                              field="engine.precision")
        if self.max_sessions < 1:
            raise ConfigError("must be >= 1", field="engine.max_sessions")
        check_threads(self.threads, field="engine.threads")
        if self.cache_tokens < 1:  # the engine refused it too, but only once the daemon was listening
            raise ConfigError("must be >= 1", field="engine.cache_tokens")
        if not 1 <= self.max_new_tokens <= 65536:
            raise ConfigError("must be between 1 and 65536", field="engine.max_new_tokens")
        if not 0 <= self.prompt_lookup <= MAX_PROMPT_LOOKUP_TOKENS:
            raise ConfigError(f"must be between 0 and {MAX_PROMPT_LOOKUP_TOKENS}", field="engine.prompt_lookup")
        self.provider_list()  # options for a provider that is not listed are a configuration error

    def provider_list(self) -> list[ProviderSpec]:
        """``providers`` with their ``provider_options``, as onnxruntime takes them."""
        return provider_specs(self.providers, self.provider_options, field="engine.provider_options", error=ConfigError)


@documented
@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The local daemon (``[server]`` of ``edge-runtime serve``)."""

    host: str = setting("127.0.0.1", help="HTTP bind address (loopback by default; anything else needs allow_remote)")
    port: int = setting(8080, help="HTTP port (0: any free port)")
    allow_remote: bool = setting(False, help="allow binding a non-loopback address (the daemon has no authentication)")
    grpc_socket: str = setting(str(default_socket_path()), path=True,
                               help="Unix socket for the gRPC service (empty: disabled)")
    queue_size: int = setting(16, help="requests waiting for the engine before new ones get 429")
    request_timeout_s: float = setting(300.0, help="longest a request may take, queueing included")
    drain_timeout_s: float = setting(30.0, help="on SIGTERM, how long in-flight requests may finish")
    log_content: bool = setting(False, help="log prompts and answers (off: only sizes and timings are logged)")
    max_body_bytes: int = setting(1 << 20, help="largest HTTP request body accepted (larger: 413)")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("must be between 0 and 65535", field="server.port")
        if self.queue_size < 1:
            raise ConfigError("must be >= 1", field="server.queue_size")
        if self.max_body_bytes < 1024:
            raise ConfigError("must be >= 1024", field="server.max_body_bytes")
        for name in ("request_timeout_s", "drain_timeout_s"):
            # also nan and inf, which settings built in Python (not read from a file) could hold: every request
            # then got a 400 naming a deadline_s no client sends
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"must be a finite number of seconds > 0, got {value!r:.40}", field=f"server.{name}")


@documented
@dataclass(frozen=True, kw_only=True)
class RuntimeSettings:
    """Everything ``edge-runtime serve`` and ``HybridRuntime.from_config`` read: one section per table of the config file."""

    engine: EngineSettings = setting(factory=EngineSettings, help="the edge model")
    policy: dict[str, Any] | str = setting(factory=lambda: {"type": "threshold", "p": 0.5}, path="policy",
                                           help="escalation policy: a table, or the name of one without "
                                                "parameters such as \"never\" (see edge_runtime.policies)")
    cloud: CloudSettings = setting(factory=CloudSettings, help="the bridge to escalate to")
    power: PowerSettings = setting(factory=PowerSettings, help="energy measurement")
    cost: CostSettings = setting(factory=CostSettings, help="cost model")
    server: ServerSettings = setting(factory=ServerSettings, help="the local daemon")

    def __post_init__(self) -> None:
        from .policies import policy_from_config

        policy_from_config(self.policy)  # fail at load time, naming the field, not at the first request

    def replace(self, **sections: Any) -> RuntimeSettings:
        return dataclasses.replace(self, **sections)


def load_runtime_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RuntimeSettings:
    """Defaults < TOML file (or ``data``) < environment < ``overrides`` (CLI flags)."""
    return load_settings(RuntimeSettings, config_file=config_file, data=data, env=env, overrides=overrides)
