"""The cloud bridge: the gRPC service an edge device escalates to (``cloud-bridge serve``).

``create_server(settings_or_address, ...) -> (server, port)`` builds it;
``load_bridge_settings(config_file)`` reads its one config file. Backends
(``onnx``, ``openai``, ``echo``) live in :mod:`cloud_bridge.backends`.
"""

from __future__ import annotations

from ._auth import TokenStore, add_device_token, bearer_token, hash_token, new_token, remove_device_token
from ._server import SERVICE_NAME, BridgeServer, create_server, is_loopback_address
from ._settings import (
    AuthSettings,
    BridgeSettings,
    EchoModelSettings,
    LimitsSettings,
    ModelSettings,
    OnnxModelSettings,
    OpenAIModelSettings,
    QuotaSettings,
    ServerSettings,
    load_bridge_settings,
)

__all__ = [
    "SERVICE_NAME",
    "BridgeServer",
    "create_server",
    "is_loopback_address",
    "BridgeSettings",
    "ServerSettings",
    "AuthSettings",
    "QuotaSettings",
    "LimitsSettings",
    "ModelSettings",
    "OnnxModelSettings",
    "OpenAIModelSettings",
    "EchoModelSettings",
    "load_bridge_settings",
    "TokenStore",
    "new_token",
    "hash_token",
    "bearer_token",
    "add_device_token",
    "remove_device_token",
]
